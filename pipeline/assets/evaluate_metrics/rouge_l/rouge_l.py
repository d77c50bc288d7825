"""ROUGE-L F1 as an `evaluate` metric module, kept in the repo so it loads offline.

`evaluate.load("rouge")` downloads its script from the hub; this module is loaded by path
(`evaluate.load("<repo>/pipeline/assets/evaluate_metrics/rouge_l")`) and scores with `rouge_score`.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F1 between predictions and references (longest common subsequence)."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings.
    use_stemmer: apply the Porter stemmer before matching (default False).
Returns:
    rougeL: mean F1 in [0, 1].
"""
_CITATION = """@inproceedings{lin-2004-rouge, title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [
            scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references, strict=True)
        ]
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0}
