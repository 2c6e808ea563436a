"""Option parsing shared by `hf-longattn niah` and the lm-eval model (no model is loaded here)."""

import pytest

from hf_longattn import ConfigError
from hf_longattn.eval.options import (
    check_method_options, parse_length, parse_lengths, parse_method_args, parse_options, parse_value,
)


def test_lengths_read_k_as_1024():
    assert parse_length("2k") == 2048
    assert parse_length("1.5K") == 1536
    assert parse_length("4096") == 4096
    assert parse_lengths("4k,1k,4096") == [1024, 4096]


@pytest.mark.parametrize("bad", ["4q", "", "0", "1.3"])
def test_bad_lengths_say_how_to_write_them(bad):
    with pytest.raises(ValueError, match="token|at least|whole"):
        parse_lengths(bad) if bad == "" else parse_length(bad)


def test_values_are_typed():
    assert parse_value("2048") == 2048 and isinstance(parse_value("2048"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("none") is None
    assert parse_value("[0, 1]") == [0, 1]
    assert parse_value("0;1;2") == [0, 1, 2]
    assert parse_value("hip") == "hip"
    assert parse_value(7) == 7  # lm-eval's CLI hands over typed values


def test_options_keep_lists_whole():
    assert parse_options("budget=2048,dense_layers=[0,1],flag=true") == {"budget": 2048, "dense_layers": [0, 1], "flag": True}
    assert parse_options('{"budget": 512}') == {"budget": 512}
    with pytest.raises(ValueError, match="key=value"):
        parse_options("budget")


def test_method_args_both_forms():
    methods = ["dense", "streaming"]
    assert parse_method_args('{"streaming": {"window": 256}}', methods) == {"dense": {}, "streaming": {"window": 256}}
    assert parse_method_args("streaming.window=256,streaming.sink=4", methods)["streaming"] == {"window": 256, "sink": 4}
    with pytest.raises(ValueError, match="not in --methods"):
        parse_method_args("hip.budget=3", methods)
    with pytest.raises(ValueError, match="name its method"):
        parse_method_args("window=3", methods)


def test_method_options_are_checked_by_the_method():
    check_method_options("streaming", {"window": 256})
    with pytest.raises(ConfigError, match="no option windw"):
        check_method_options("streaming", {"windw": 256})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        check_method_options("nope", {})


def test_lm_eval_model_args_split_between_hflm_and_method():
    pytest.importorskip("lm_eval")
    from hf_longattn.eval.lm_eval_model import split_model_args

    hflm, method = split_model_args({"batch_size": 2, "dtype": "float32", "device_map": "auto", "window": "256",
                                     "dense_layers": "0;1"})
    assert hflm == {"batch_size": 2, "dtype": "float32", "device_map": "auto"}
    assert method == {"window": 256, "dense_layers": [0, 1]}


def test_lm_eval_model_rejects_bad_options_before_loading():
    pytest.importorskip("lm_eval")
    from hf_longattn.eval.lm_eval_model import LongAttnLM

    # The model name does not exist: getting the ConfigError proves nothing was loaded first.
    with pytest.raises(ConfigError, match="no option windw"):
        LongAttnLM(pretrained="no-such/model", method="streaming", windw=256)
    with pytest.raises(ValueError, match="unknown method"):
        LongAttnLM(pretrained="no-such/model", method="nope")
    with pytest.raises(ValueError, match="no method="):
        LongAttnLM(pretrained="no-such/model", window=256)
