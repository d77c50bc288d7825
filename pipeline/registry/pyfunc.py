"""The registered model: base + adapter, generating text. MLflow runs this file as model code
(`registry.versions` logs it), so it imports only what loading needs."""

from __future__ import annotations

from typing import Any

import mlflow


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Loads the base model named in `pipeline_base.json`, applies the adapter, generates."""

    # Prompts come as a str, a list or a DataFrame: no type hints on `predict`, so no schema
    # validation, and this flag (MLflow's own, used by its ChatModel) skips the warning about it.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from pipeline.model.adapter import load_adapter

        self.model, self.tokenizer = load_adapter(context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):
        from pipeline.model.adapter import generate_answers, prompts_from

        params = params or {}
        return generate_answers(
            self.model, self.tokenizer, prompts_from(model_input), int(params.get("max_new_tokens", 64))
        )


if __name__.startswith("code_model_"):  # MLflow is loading a logged model from this file
    mlflow.models.set_model(AdapterModel())
