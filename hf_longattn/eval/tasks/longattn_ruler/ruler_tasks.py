# lm-eval imports `!function` targets from files beside the YAML; the code lives in hf_longattn.eval.ruler.
from hf_longattn.eval.ruler import (  # noqa: F401
    mean_of_scored, niah_multikey_essay, niah_single_essay, niah_single_repeat, qa_hotpotqa, qa_squad, score_all,
    score_any,
)
