"""The translator as an MLflow pyfunc "model from code".

MLflow stores this file itself with the model (not a pickle of an object), the artifact files of
the exported translator, and in code/ the few project modules this file imports
(launch.release.registry.SHIPPED_MODULES: the export's loader, translate_uint8 and model/, with
their package paths; MLflow puts code/ on sys.path before loading). Loading runs this file and
`load_context`, which rebuilds the network from translator.json and reads translator.safetensors.
Nothing is unpickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and nothing of
the project needs to be installed: the model's requirements.txt (torch, numpy, safetensors,
mlflow, pinned) is all it needs.

Input: a batch of uint8 HWC RGB images, shape [N, H, W, 3]. Output: the same shape and dtype.
Params: `direction` ("a2b" or "b2a", default "a2b"), `batch_size` (default 16).
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# The input schema comes from the logged signature (uint8 tensors). predict's `np.ndarray` hint is
# one MLflow infers no schema from (so the signature stays the one that validates), and it keeps
# MLflow from printing "Add type hints to the `predict` method" at every save and load.

ARTIFACT_KEY = "translator"   # artifacts={"translator": <dir with translator.json + .safetensors>}


class TranslatorModel(PythonModel):
    def load_context(self, context):
        import torch

        from launch.release.export import load_translator, size_multiple

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gen, self.meta = load_translator(context.artifacts[ARTIFACT_KEY], device=device)
        self.multiple = size_multiple(self.meta)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        from launch.release.export import DIRECTIONS, translate_uint8

        params = params or {}
        direction = params.get("direction") or "a2b"
        if direction not in DIRECTIONS:
            raise ValueError(f"params.direction: expected one of {DIRECTIONS}, got {direction!r}")
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
            model_input = next(iter(model_input.values()))
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"input: expected uint8 images [N, H, W, 3], got shape {list(images.shape)}")
        if images.dtype != np.uint8:
            # JSON requests arrive as integers; accept them when they are valid pixel values.
            if images.size and (images.min() < 0 or images.max() > 255):
                raise ValueError("input: pixel values must lie in 0..255")
            images = images.astype(np.uint8)
        return translate_uint8(self.gen, images, direction, batch_size=int(params.get("batch_size") or 16),
                               multiple=self.multiple)


mlflow.models.set_model(TranslatorModel())
