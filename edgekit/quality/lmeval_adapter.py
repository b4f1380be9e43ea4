"""Let lm-evaluation-harness drive an edgekit bundle (or a skipped checkpoint) as model type `edgekit`.

Optional: `pip install 'edgekit[lmeval]'`. lm-eval finds models by import, so either import this module
before calling `lm_eval.simple_evaluate(model="edgekit", model_args="model=out/x")`, or run lm-eval's
own command line through it:

    python -m edgekit.quality.lmeval_adapter run --model edgekit --model_args model=out/skip2-int4 --tasks hellaswag

Scores are computed by the same functions as `edgekit eval` (`eval_tasks.loglikelihood`,
`perplexity.token_nlls`), so the two agree on the same data.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from edgekit.quality.models import open_scorer
from edgekit.quality.perplexity import token_nlls
from edgekit.quality.scorers import Scorer
from edgekit.quality.tasks import loglikelihood
from edgekit.skip.skipset import parse_skip_count

DEFAULT_MAX_GEN_TOKS = 256


@register_model("edgekit")
class EdgekitLM(LM):
    """model=BUNDLE_OR_MODEL[,skip=N][,skip_layers=LIST][,integrity=false]; batch/device options are ignored
    (a bundle runs on onnxruntime's CPU provider, one sequence at a time)."""

    def __init__(
        self,
        model: str | None = None,
        skip: int | str | None = None,
        skip_layers: str | None = None,
        integrity: bool | str = True,
        scorer: Scorer | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        if scorer is None:
            if model is None:
                raise ValueError("EdgekitLM needs model=BUNDLE_OR_MODEL")
            check = str(integrity).lower() not in ("false", "0", "no")
            scorer = open_scorer(
                str(model), parse_skip_count(str(skip)) if skip is not None else None, skip_layers, check
            )
        self.scorer = scorer

    @property
    def tokenizer_name(self) -> str:
        return self.scorer.name

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            result = loglikelihood(self.scorer, context, continuation)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        window = self.scorer.max_context
        for req in requests:
            (text,) = req.args
            ids = self.scorer.encode(text)  # BOS first: the first real token is scored too
            prefix = self.scorer.bos_token_id if self.scorer.bos_token_id is not None else None
            if prefix is None and self.scorer.eos_token_ids:
                prefix = self.scorer.eos_token_ids[0]  # lm-eval's convention for tokenizers without BOS
            if prefix is not None and (not ids or ids[0] != prefix):
                ids = [prefix, *ids]
            total = -float(token_nlls(self.scorer.logits, ids, window, max(1, window // 2)).sum())
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            new = self.scorer.generate(self.scorer.encode(context), max_new, until)
            text = self.scorer.decode(new)
            for stop in until:  # lm-eval's convention: cut at the first stop sequence, exclusive
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
