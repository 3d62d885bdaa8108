"""Policy loading, validation (every error names file, rule, key), discovery order and matching."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transformers_fastpath import Hardware, Policy, PolicyError, load_policy
from transformers_fastpath.planning.model_info import ModelInfo
from transformers_fastpath.planning.policy import SETTINGS, parse_count, parse_memory_gib

GOOD = """
[defaults]
quantization = "none"
batch_size = 16

[[rules]]
name = "big-decoders-on-small-gpus"
match = { task = "text-generation", min_params = "7B", max_device_memory = "24GiB" }
quantization = "auto"

[[rules]]
name = "bert-on-cpu"
match = { model_type = ["bert", "roberta"], device = "cpu" }
encoder_fastpath = true
sdpa_backends = ["flash", "math"]
"""


def write(tmp_path: Path, text: str, name: str = "fastpath.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_policy_file_loads_with_typed_values(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, GOOD))
    assert policy.defaults["batch_size"] == 16
    assert [r.name for r in policy.rules] == ["big-decoders-on-small-gpus", "bert-on-cpu"]
    big = policy.rules[0]
    assert big.match.conditions["min_params"] == 7_000_000_000
    assert big.match.conditions["max_device_memory"] == 24.0
    assert policy.rules[1].settings["sdpa_backends"] == ("flash", "math")
    assert policy.source.endswith("fastpath.toml")


def test_dict_and_policy_objects_are_accepted() -> None:
    policy = load_policy({"defaults": {"dtype": "bfloat16"}})
    assert policy.defaults["dtype"] == "bfloat16"
    assert load_policy(policy) is policy
    assert policy.source == "<dict>"


def test_policy_round_trips_through_to_dict(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, GOOD))
    again = Policy.from_dict(policy.to_dict())
    assert again.defaults == policy.defaults
    assert [r.settings for r in again.rules] == [r.settings for r in policy.rules]
    assert [r.match.conditions for r in again.rules] == [r.match.conditions for r in policy.rules]


# (policy text, substring the message must contain naming the key, rule label expected or None)
MALFORMED = [
    ('[defaults]\ndtype = "float64"\n', "key 'dtype'", None),
    ('[defaults]\nattn_implementation = "fast"\n', "key 'attn_implementation'", None),
    ('[defaults]\nbatch_size = 0\n', "key 'batch_size'", None),
    ('[defaults]\nbatch_size = "big"\n', "key 'batch_size'", None),
    ('[defaults]\nbatch_size = true\n', "key 'batch_size'", None),
    ('[defaults]\nencoder_fastpath = "yes"\n', "key 'encoder_fastpath'", None),
    ('[defaults]\nquantization = "int3"\n', "key 'quantization'", None),
    ('[defaults]\nplacement = "everywhere"\n', "key 'placement'", None),
    ('[defaults]\ndevice = "tpu"\n', "key 'device'", None),
    ('[defaults]\nmemory_headroom = 1.5\n', "key 'memory_headroom'", None),
    ('[defaults]\nstrict = "true"\n', "key 'strict'", None),
    ('[defaults]\nsdpa_backends = ["flash", "turbo"]\n', "key 'sdpa_backends'", None),
    ('[defaults]\nsdpa_backends = ["math", "math"]\n', "key 'sdpa_backends'", None),
    ('[defaults]\nsdpa_backends = []\n', "key 'sdpa_backends'", None),
    ('[defaults]\nturbo = true\n', "key 'turbo'", None),
    ('dtype = "float16"\n', "key 'dtype'", None),
    ('[server]\nport = 1\n', "key 'server'", None),
    ('defaults = 3\n', "key 'defaults'", None),
    ('rules = "all"\n', "key 'rules'", None),
    ('[[rules]]\nname = "r"\ndtype = "float16"\n', "key 'match'", "rule #0 ('r')"),
    ('[[rules]]\nname = "r"\nmatch = { colour = "red" }\ndtype = "float16"\n', "key 'match.colour'", "rule #0 ('r')"),
    ('[[rules]]\nmatch = {}\ndtype = "float16"\n[[rules]]\nname = "second"\nmatch = { min_params = "lots" }\n'
     'dtype = "float16"\n', "key 'match.min_params'", "rule #1 ('second')"),
    ('[[rules]]\nname = "mem"\nmatch = { max_device_memory = "24 parsecs" }\ndtype = "float16"\n',
     "key 'match.max_device_memory'", "rule #0 ('mem')"),
    ('[[rules]]\nname = "dev"\nmatch = { device = "gpu" }\ndtype = "float16"\n', "key 'match.device'",
     "rule #0 ('dev')"),
    ('[[rules]]\nname = "empty"\nmatch = {}\n', "rule #0 ('empty')", "rule #0 ('empty')"),
    ('[[rules]]\nname = "r"\nmatch = {}\nbatch_size = -4\n', "key 'batch_size'", "rule #0 ('r')"),
    ('[[rules]]\nname = "inverted"\nmatch = { min_params = "7B", max_params = "1B" }\ndtype = "float16"\n',
     "key 'match.min_params'", "rule #0 ('inverted')"),
    ('[[rules]]\nname = 5\nmatch = {}\ndtype = "float16"\n', "key 'name'", "rule #0"),
    ('[[rules]]\nname = "t"\nmatch = { task = [] }\ndtype = "float16"\n', "key 'match.task'", "rule #0 ('t')"),
    ('[defaults\ndtype = 1\n', "not valid TOML", None),
]


@pytest.mark.parametrize("text, key_part, rule_part", MALFORMED)
def test_malformed_policies_name_file_rule_and_key(tmp_path: Path, text: str, key_part: str,
                                                    rule_part: str | None) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message
    assert key_part in message
    if rule_part:
        assert rule_part in message


def test_error_lists_allowed_values_and_bad_value(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, '[defaults]\ndtype = "float64"\n'))
    assert "'float64'" in str(info.value)
    assert "'bfloat16'" in str(info.value)
    assert info.value.key == "dtype"


def test_missing_file_and_directory_are_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.toml")
    with pytest.raises(PolicyError, match="directory"):
        load_policy(tmp_path)


def test_every_setting_has_a_default_that_validates() -> None:
    for setting in SETTINGS.values():
        assert setting.validate(setting.default) == setting.default or setting.default == "auto"


@pytest.mark.parametrize("text, expected", [("7B", 7_000_000_000), ("350M", 350_000_000), ("1.5b", 1_500_000_000),
                                            ("125k", 125_000), (42, 42)])
def test_parse_count(text: object, expected: int) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize("text, expected", [("24GiB", 24.0), ("512MiB", 0.5), (80, 80.0), ("1TiB", 1024.0)])
def test_parse_memory(text: object, expected: float) -> None:
    assert parse_memory_gib(text) == pytest.approx(expected)


# -- discovery ------------------------------------------------------------------------

@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("TRANSFORMERS_FASTPATH", "TRANSFORMERS_FASTPATH_POLICY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_discovery_builtin_default(no_env: Path) -> None:
    assert load_policy(None).source == "built-in default"


def test_discovery_order(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (no_env / "pyproject.toml").write_text('[tool.transformers-fastpath.defaults]\nbatch_size = 1\n')
    assert load_policy(None).defaults["batch_size"] == 1
    assert "pyproject.toml [tool.transformers-fastpath]" in load_policy(None).source
    write(no_env, '[defaults]\nbatch_size = 2\n')
    assert load_policy(None).defaults["batch_size"] == 2
    env_switch = write(no_env, '[defaults]\nbatch_size = 3\n', "switch.toml")
    monkeypatch.setenv("TRANSFORMERS_FASTPATH", str(env_switch))
    assert load_policy(None).defaults["batch_size"] == 3
    env_policy = write(no_env, '[defaults]\nbatch_size = 4\n', "env.toml")
    monkeypatch.setenv("TRANSFORMERS_FASTPATH_POLICY", str(env_policy))
    assert load_policy(None).defaults["batch_size"] == 4
    assert load_policy({"defaults": {"batch_size": 5}}).defaults["batch_size"] == 5  # call argument wins


def test_pyproject_without_table_is_ignored_by_discovery(no_env: Path) -> None:
    (no_env / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_policy(None).source == "built-in default"


def test_switch_value_1_does_not_count_as_a_path(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMERS_FASTPATH", "1")
    assert load_policy(None).source == "built-in default"


# -- matching ---------------------------------------------------------------------------

def _info(model_type: str = "llama", params: int | None = 8_000_000_000, task: str | None = "text-generation"):
    return ModelInfo(name="m", model_type=model_type, architectures=("LlamaForCausalLM",), num_params=params,
                     task=task)


def test_rule_matching(tmp_path: Path) -> None:
    big = load_policy(write(tmp_path, GOOD)).rules[0]
    a10g = Hardware.from_profile("a10g")
    h100 = Hardware.from_profile("h100")
    assert big.match.failed_condition(_info(), a10g) is None
    assert "device memory" in big.match.failed_condition(_info(), h100)
    assert "parameters" in big.match.failed_condition(_info(params=1_000_000_000), a10g)
    assert "parameters" in big.match.failed_condition(_info(params=None), a10g)
    assert "task" in big.match.failed_condition(_info(task="feature-extraction"), a10g)


# -- fuzzing: only PolicyError may escape the loader -------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["auto", "7B", "24GiB", "float16", "sdpa", "cpu"]))
_keys = st.one_of(st.sampled_from([*SETTINGS, "match", "name", "defaults", "rules", "min_params", "task",
                                   "device", "max_device_memory"]), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=4))
def test_fuzzed_dicts_raise_only_policy_error(data: dict) -> None:
    try:
        Policy.from_dict(data)
    except PolicyError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_toml_text_raises_only_policy_error(text: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8",
                                     errors="surrogatepass") as fh:
        try:
            fh.write(text)
        except UnicodeEncodeError:
            return
        name = fh.name
    try:
        load_policy(name)
    except PolicyError:
        pass
    finally:
        Path(name).unlink()


# -- round-2 gaps: a byte-order mark, absurd counts, task typos in rules -----------------------

def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "fastpath.toml"
    path.write_bytes(b"\xef\xbb\xbf[defaults]\nbatch_size = 8\n")  # what Windows editors save
    assert load_policy(path).defaults["batch_size"] == 8


@pytest.mark.parametrize("value", [0, 10**17, 1 << 21])
def test_batch_size_out_of_range_is_rejected(value: int) -> None:
    with pytest.raises(PolicyError, match="integer from 1 to 1048576"):
        load_policy({"defaults": {"batch_size": value}})


def test_a_rule_matching_a_misspelt_task_warns_once_with_the_close_match() -> None:
    import warnings

    from transformers import BertConfig

    from transformers_fastpath import resolve

    policy = {"rules": [{"name": "typo", "match": {"task": "text-clasification"}, "batch_size": 8},
                        {"name": "fine", "match": {"task": ["fill-mask", "ner"]}, "batch_size": 4}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            plan = resolve(BertConfig(), task="fill-mask", policy=policy, hardware=Hardware())
    messages = [str(w.message) for w in caught if "never matches" in str(w.message)]
    assert len(messages) == 1, messages
    assert "rule #0 'typo'" in messages[0] and "did you mean 'text-classification'?" in messages[0]
    assert plan["batch_size"] == 4  # the well-spelt rule still applies
