"""kvblend.config.Config: defaults, accepted forms and every rejected value,
validated by the one C parser with messages that name the variable."""

import dataclasses

import pytest

kvblend = pytest.importorskip("kvblend")
from kvblend import _clib as clib, _ext  # noqa: E402

try:
    ext = _ext.load()
except ImportError as exc:  # the C extension is not built
    pytest.skip(str(exc), allow_module_level=True)

from kvblend.config import Config  # noqa: E402


def test_config_defaults_match_lmcache():
    c = Config.default()
    assert c.enable_blending is False
    assert c.blend_special_str == " # # "
    assert c.use_layerwise is False
    assert c.check_layers == (1,)
    assert c.recompute_ratios == (0.15,)
    assert c.thresholds is None
    assert c.chunk_size == 256
    assert c.local_cpu is True
    assert c.max_local_cpu_size_gb == 5.0
    assert c.enable_sparse is False
    assert c.max_device_size_gb == 0.0
    assert c.deviation == "kv"
    assert c.selection == "query_deviation" and c.boundary_tokens == 4 and c.self_test
    assert c.num_threads == 0
    assert c.log_level == "warning"
    assert c.items == ()


def test_config_from_env_reads_only_kvblend_variables():
    env = {
        "LMCACHE_ENABLE_BLENDING": "True",
        "LMCACHE_USE_LAYERWISE": "1",
        "LMCACHE_BLEND_SPECIAL_STR": " ## ",
        "LMCACHE_BLEND_CHECK_LAYERS": "1,3,5",
        "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.3,0.2,0.1",
        "LMCACHE_BLEND_THRESHOLDS": "0.5",
        "LMCACHE_CHUNK_SIZE": " 512 ",
        "LMCACHE_LOCAL_CPU": "false",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5",
        "LMCACHE_EXTRA_CONFIG": '{"enable_sparse": true}',
        "LMCACHE_SOME_OTHER_SETTING": "ignored",
        "KVBLEND_MAX_DEVICE_SIZE": "1",
        "KVBLEND_DEVIATION": "kv",
        "KVBLEND_NUM_THREADS": "3",
        "KVBLEND_LOG_LEVEL": "debug",
        "HOME": "/nowhere",
        "OTHER": "x",
    }
    c = Config.from_env(env)
    assert (c.enable_blending, c.use_layerwise, c.local_cpu, c.enable_sparse) == (True, True, False, True)
    assert c.blend_special_str == " ## "
    assert c.check_layers == (1, 3, 5)
    assert c.recompute_ratios == (0.3, 0.2, 0.1)
    assert c.thresholds == (0.5,)
    assert c.chunk_size == 512
    assert c.max_local_cpu_size_gb == 2.5
    assert c.max_device_size_gb == 1.0
    assert (c.deviation, c.num_threads, c.log_level) == ("kv", 3, "debug")
    names = dict(c.items)
    assert "HOME" not in names and "OTHER" not in names
    assert names["LMCACHE_CHUNK_SIZE"] == " 512 "
    assert [c.ratio_at(i) for i in range(3)] == [0.3, 0.2, 0.1]


def test_config_from_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "64")
    monkeypatch.setenv("KVBLEND_DEVIATION", "v")
    c = Config.from_env()
    assert c.chunk_size == 64 and c.deviation == "v"
    assert clib.config_dict(clib.config_from_env())["chunk_size"] == 64


def test_config_is_frozen_and_items_rebuild_it():
    c = Config.from_items({"LMCACHE_BLEND_CHECK_LAYERS": "2", "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.5"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_size = 1
    assert Config.from_items(c.items) == c
    assert c.ratio_at(0) == 0.5
    with pytest.raises(IndexError):
        c.ratio_at(1)


@pytest.mark.parametrize("name,value,fragment", [
    ("LMCACHE_ENABLE_BLENDING", "maybe", "expected True, False"),
    ("LMCACHE_USE_LAYERWISE", "2", "expected True, False"),
    ("LMCACHE_LOCAL_CPU", "yes", "expected True, False"),
    ("LMCACHE_BLEND_SPECIAL_STR", "", "empty"),
    ("LMCACHE_BLEND_CHECK_LAYERS", "2,1", "strictly increasing"),
    ("LMCACHE_BLEND_CHECK_LAYERS", "a", ""),
    ("LMCACHE_BLEND_RECOMPUTE_RATIOS", "1.5", "outside (0, 1]"),
    ("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0", "outside (0, 1]"),
    ("LMCACHE_BLEND_THRESHOLDS", "-1", "negative"),
    ("LMCACHE_CHUNK_SIZE", "0", "> 0"),
    ("LMCACHE_CHUNK_SIZE", "abc", ""),
    ("LMCACHE_MAX_LOCAL_CPU_SIZE", "-1", "out of range"),
    ("LMCACHE_EXTRA_CONFIG", "{bad", "JSON"),
    ("KVBLEND_MAX_DEVICE_SIZE", "x", "GB"),
    ("KVBLEND_DEVIATION", "q", "k, v or kv"),
    ("KVBLEND_NUM_THREADS", "-2", "expected 0 (all cores) to 256"),
    ("KVBLEND_NUM_THREADS", "257", "257 is out of range"),
    ("KVBLEND_LOG_LEVEL", "loud", "debug, info, warning or error"),
    ("KVBLEND_NOPE", "1", "unknown kvblend variable"),
])
def test_config_bad_value_names_the_variable(name, value, fragment):
    with pytest.raises(kvblend.InvalidError) as info:
        Config.from_env({name: value})
    msg = str(info.value)
    assert name in msg
    assert f'"{value}"' in msg
    assert fragment in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, kvblend.Error)


@pytest.mark.parametrize("extra", [
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.3,0.2,0.1"},
    {"LMCACHE_BLEND_THRESHOLDS": "1,2,3"},
])
def test_config_cross_field_rules_name_both_variables(extra):
    with pytest.raises(kvblend.InvalidError) as info:
        Config.from_items({"LMCACHE_BLEND_CHECK_LAYERS": "1,2", **extra})
    msg = str(info.value)
    assert "LMCACHE_BLEND_CHECK_LAYERS" in msg and next(iter(extra)) in msg


def test_config_non_str_values_are_converted_and_others_refused():
    c = Config.from_items({"LMCACHE_CHUNK_SIZE": 128, "LMCACHE_LOCAL_CPU": False, "LMCACHE_MAX_LOCAL_CPU_SIZE": 0.5})
    assert (c.chunk_size, c.local_cpu, c.max_local_cpu_size_gb) == (128, False, 0.5)
    with pytest.raises(TypeError, match="LMCACHE_CHUNK_SIZE"):
        Config.from_items({"LMCACHE_CHUNK_SIZE": [1]})
    with pytest.raises(TypeError, match="names must be str"):
        clib.parse_config({1: "2"})


def test_config_fields_come_from_the_c_table_and_pickle():
    import copy
    import pickle

    c = Config.from_items({"LMCACHE_CHUNK_SIZE": "12", "KVBLEND_DEVIATION": "V"})
    # one field per setting of the C table that stores one (kvb_config_get)
    assert set(c.fields()) == set(clib.config_dict(clib.parse_config({})))
    assert {"enable_blending", "check_layers", "remote_part_size_mb", "verify_checksums"} <= set(c.fields())
    assert (c.chunk_size, c.deviation, c.thresholds, c.local_disk) == (12, "v", None, None)
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c
    assert c != Config.default() and hash(c) == hash(Config.from_items(c.items))
    with pytest.raises(AttributeError, match="no setting 'chunk_sise'"):
        c.chunk_sise  # noqa: B018


@pytest.mark.parametrize("extra, message", [
    ({"kvblend.save": "false"}, "'kvblend.save'='false': expected true or false"),
    ({"kvblend.namspace": "a"}, "unknown option 'kvblend.namspace'; known: kvblend.settings"),
    ({"kvblend.separator_ids": [3, -1]}, r"entry 1 \(-1\) is not a token id"),
    ({"kvblend.separator_ids": []}, "expected a non-empty list of token ids"),
    ({"kvblend.cuda_graph_max_tokens": True}, "expected an int >= 0"),
    ({"kvblend.settings": {"VLLM_X": 1}}, "expected a dict of LMCACHE_"),
    ({"kvblend.namespace": 3}, "expected a str"),
    ({"kvblend.subset_attention": "kvblend"}, "expected one of 'flex', 'sdpa'"),
    ({"kvblend.profile": ""}, "'kvblend.profile'='': expected a file path"),
    ({"kvblend.compile": "on"}, "'kvblend.compile'='on': expected true, false or null"),
])
def test_engine_options_refuse_typos_and_bad_values(extra, message):
    from kvblend.config import engine_options

    with pytest.raises(ValueError, match=message):
        engine_options(extra)


def test_engine_options_defaults_and_foreign_keys():
    from kvblend.config import ENGINE_OPTIONS, engine_options

    opts = engine_options({"lmcache.blend": 1, "kvblend.save": False, "kvblend.separator_ids": [5]})
    assert opts["save"] is False and opts["separator_ids"] == [5]
    # compile: None, the connector's choice (compiled in the built-in engine,
    # eager under vLLM)
    assert opts["compile"] is None and opts["namespace"] == "" and opts["cuda_graph_max_tokens"] == 2048
    assert set(opts) == {k[len("kvblend."):] for k in ENGINE_OPTIONS}
