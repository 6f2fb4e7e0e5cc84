/* Compiled alone by CTest with -std=c11 -pedantic -Werror: the public header
 * must need nothing but itself. */
#include "kvblend.h"

/* Uses one declaration so the include cannot be optimised into nothing. */
const char *(*kvb_header_probe)(kvb_status) = kvb_status_str;
