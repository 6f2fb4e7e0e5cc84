# Sourced by the GPU scripts: build dependencies missing on the machine
# (libxxhash, check, libcjson, hiredis, redis-server) may be brought as .deb
# files in .debs/; they are unpacked to /tmp/debroot and made visible to
# pkg-config, the linker, the loader and PATH.  Sets KVB_DEB_CMAKE_ARGS
# (empty without .debs/) for KVB_CMAKE_ARGS.
KVB_DEB_CMAKE_ARGS=""
if ls .debs/*.deb >/dev/null 2>&1; then
  for f in .debs/*.deb; do dpkg -x "$f" /tmp/debroot; done
  R=/tmp/debroot/usr
  export PKG_CONFIG_PATH=$R/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}
  # point the .pc files at the unpacked tree (hiredis.pc spells its
  # folders out instead of deriving them from prefix)
  sed -i -e "s|^prefix=.*|prefix=$R|" -e "s|=/usr/include|=$R/include|" \
    -e "s|^libdir=/usr/lib\$|libdir=$R/lib/x86_64-linux-gnu|" \
    -e "s|=/usr/lib/x86_64-linux-gnu|=$R/lib/x86_64-linux-gnu|" \
    $R/lib/x86_64-linux-gnu/pkgconfig/*.pc 2>/dev/null
  export LD_LIBRARY_PATH=$R/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  export PATH=$R/bin:$PATH  # redis-server, when brought, for the remote tier's tests
  KVB_DEB_CMAKE_ARGS="-DCMAKE_PREFIX_PATH=$R -DXXHASH_INCLUDE_DIR=$R/include -DXXHASH_LIBRARY=$(ls $R/lib/x86_64-linux-gnu/libxxhash.so.0* | head -1)"
fi
