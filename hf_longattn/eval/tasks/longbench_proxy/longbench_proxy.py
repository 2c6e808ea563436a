# lm-eval imports `!function` targets from files beside the YAML; the code lives in hf_longattn.eval.longbench.
from hf_longattn.eval.longbench import proxy_dataset, proxy_score  # noqa: F401
from hf_longattn.eval.ruler import mean_of_scored  # noqa: F401
