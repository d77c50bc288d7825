"""Loads pydoc_mc.jsonl from beside this file, whatever the working directory."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load(**kwargs) -> datasets.DatasetDict:
    lines = (HERE / "pydoc_mc.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x])})
