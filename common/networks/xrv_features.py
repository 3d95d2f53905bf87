"""FID features of chest radiographs from torchxrayvision's DenseNet-121 ``densenet121-res224-all``, offline.

The network is torchxrayvision's chest X-ray classifier (Cohen et al., https://arxiv.org/abs/2002.02497), trained on
NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI and RSNA radiographs. The FID feature is its 1024-d pooled
embedding, what ``xrv.models.DenseNet.features2`` returns: ReLU of the last dense block's batch-normalized maps,
averaged over space.

torchxrayvision itself is not a dependency: it imports torchvision, whose CUDA-linked wheels do not import beside
the CPU build of torch. The architecture is MONAI's :class:`monai.networks.nets.DenseNet121`, which computes the same
function as xrv's DenseNet; :func:`xrv_state_dict_to_monai` renames xrv's state-dict keys onto it.

The weights are read from a local file only (never downloaded): either torchxrayvision's own file (a pickled
model, read with an inert unpickler, see :func:`read_xrv_state_dict`) or a plain state dict of that model.

Input scaling is the model's, not the raw image's: 1 channel, 224 x 224, values in [-1024, 1024]
(:func:`xrv_preprocess`). Feeding unscaled images (e.g. [0, 1] at 512 x 512) gives features of inputs the network
never saw in training.
"""

from __future__ import annotations

import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from torch import nn

from common.networks.feature_extractors import FeatureExtractor

#: File name torchxrayvision gives the ``densenet121-res224-all`` weights (``xrv.models.model_urls["all"]``).
XRV_DENSENET_WEIGHTS_NAME = (
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
)
XRV_DENSENET_WEIGHTS_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{XRV_DENSENET_WEIGHTS_NAME}"
XRV_HOW_TO_GET = (
    f"On a machine with internet access download {XRV_DENSENET_WEIGHTS_URL} (28 MB; torchxrayvision keeps the same "
    f"file as ~/.torchxrayvision/models_data/{XRV_DENSENET_WEIGHTS_NAME} once it has loaded "
    "DenseNet(weights='densenet121-res224-all')), copy it here and pass --feature_extractor_weights PATH."
)

#: Side of the square input the model was trained on.
XRV_RESOLUTION = 224
#: Input values: image intensity 0 -> -1024, maximum -> +1024 (``xrv.utils.normalize(img, maxval)``).
XRV_INPUT_RANGE = (-1024.0, 1024.0)
#: Size of the pooled features.
XRV_FEATURE_DIM = 1024
#: Outputs of the classifier head (the 18 pathologies of ``xrv.datasets.default_pathologies``).
XRV_NUM_CLASSES = 18

# xrv: features.denseblockB.denselayerL.{norm1,conv1,norm2,conv2}.P; MONAI puts these in a `layers` Sequential.
_DENSE_LAYER_KEY = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.((?:norm|conv)[12]\..+)$")
# Buffers xrv may add that are not weights (operating-point thresholds of a loaded xrv model).
_IGNORED_KEYS = frozenset({"op_threshs"})


def xrv_preprocess(images: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """Scale images ``(N, 1, H, W)`` in [0, 1] to xrv DenseNet input ``(N, 1, 224, 224)`` in [-1024, 1024].

    Steps, as torchxrayvision prepares its training images (``XRayCenterCrop``, ``XRayResizer(224)``,
    ``normalize``):

    1. ``transpose`` (default): swap the two spatial axes. The model was trained on upright radiographs, rows
       running from head to feet; this project's radiographs are in MONAI's PIL-reader layout ``(1, W, H)``
       (``common.data.cxr.transforms.LoadRadiographd``: first spatial axis across the image, second down it), so
       they are transposed before the network sees them. Pass ``False`` for images already ``(N, 1, rows, cols)``.
    2. Centre crop of a non-square image to a square of its shorter side (xrv's models reject non-square input).
    3. Bilinear resize to 224 x 224, antialiased when shrinking (skimage's resize in xrv antialiases too).
    4. Clamp to [0, 1] (generated images can overshoot a little), then map linearly to [-1024, 1024].

    Returns:
        float32 tensor ``(N, 1, 224, 224)`` on the input's device.
    """
    images = torch.as_tensor(images).as_subclass(torch.Tensor)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"Expected grayscale images (N, 1, H, W), got {tuple(images.shape)}.")
    x = images.float()
    if transpose:
        x = x.transpose(-1, -2)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2  # xrv's XRayCenterCrop offsets
    x = x[..., top : top + side, left : left + side]
    if side != XRV_RESOLUTION:
        x = F.interpolate(
            x,
            size=(XRV_RESOLUTION, XRV_RESOLUTION),
            mode="bilinear",
            align_corners=False,
            antialias=side > XRV_RESOLUTION,
        )
    low, high = XRV_INPUT_RANGE
    return x.clamp(0.0, 1.0) * (high - low) + low


class XRVDenseNetFeatures(nn.Module):
    """torchxrayvision's DenseNet-121 on MONAI's implementation: ``(B, 1, 224, 224)`` -> pooled features ``(B, 1024)``.

    ``forward`` is xrv's ``features2``; :meth:`logits` adds the classifier head (18 pathology logits, before xrv's
    sigmoid and operating-point rescaling), which the weights file carries too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=XRV_NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, 1024)`` of preprocessed images ``x`` ``(B, 1, 224, 224)`` in [-1024, 1024]."""
        head = self.network.class_layers
        return head.flatten(head.pool(head.relu(self.network.features(x))))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``(B, 18)``, in the order of ``xrv.models.DenseNet.targets``."""
        return self.network.class_layers.out(self.forward(x))


def xrv_state_dict_to_monai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an xrv ``DenseNet`` state dict to those of :class:`XRVDenseNetFeatures`'s ``network``.

    ``features.denseblockB.denselayerL.{norm,conv}{1,2}.*`` -> ``features.denseblockB.denselayerL.layers.…``,
    ``classifier.*`` -> ``class_layers.out.*``; every other key (stem, transitions, ``norm5``) is the same in both.
    A ``module.`` prefix (a model saved inside ``DataParallel``) is removed and ``op_threshs`` is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _IGNORED_KEYS:
            continue
        if key.startswith("classifier."):
            key = "class_layers.out." + key.removeprefix("classifier.")
        elif match := _DENSE_LAYER_KEY.match(key):
            key = f"{match.group(1)}.layers.{match.group(2)}"
        out[key] = value
    return out


class _Inert:
    """Stand-in for any class a pickled model names: records its state, runs no code of the file's choosing."""

    dump_patches = False  # torch's source check of legacy pickles reads this; never write patch files

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_pickled_state"] = state if isinstance(state, dict) else {}


# The only callables a pickled model may reach: the rebuilders of tensors and parameters, and plain containers.
# (torch's own loader maps "...Storage" names to storage types before asking the unpickler.)
_REAL_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
}


class _InertUnpickler(pickle.Unpickler):
    """Unpickler that resolves every global outside :data:`_REAL_GLOBALS` to a fresh :class:`_Inert` subclass."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _compat_name(module, name)
        if (module, name) in _REAL_GLOBALS:
            return _REAL_GLOBALS[(module, name)]
        # Defined in this module under a qualname no source has, so torch's source-change check finds nothing.
        return type(name, (_Inert,), {"__module__": __name__, "__qualname__": f"_Inert[{module}.{name}]"})


def _compat_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names of protocol-2 pickles (``__builtin__.set``) as Python 3 ones."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    return IMPORT_MAPPING.get(module, module), name


def _inert_load(file: Any, **kwargs: Any) -> Any:
    return _InertUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load.
_inert_pickle = types.ModuleType("_xrv_inert_pickle")
_inert_pickle.Unpickler = _InertUnpickler  # type: ignore[attr-defined]
_inert_pickle.load = _inert_load  # type: ignore[attr-defined]


def _module_state_dict(root: Any) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an unpickled module tree of :class:`_Inert` objects (parameters, persistent buffers)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj: Any, prefix: str) -> None:
        if id(obj) in seen or not isinstance(obj, _Inert):
            return
        seen.add(id(obj))
        attrs = obj.__dict__.get("_pickled_state", {})
        skip = attrs.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in (attrs.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
                state[prefix + name] = value.detach()
        for name, child in (attrs.get("_modules") or {}).items():
            walk(child, f"{prefix}{name}.")

    walk(root, "")
    return state


def read_xrv_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an xrv DenseNet weights file, keyed as xrv's ``DenseNet.state_dict()``; nothing is executed.

    torchxrayvision's files are whole pickled models (``torch.save(model)``, loaded by xrv with
    ``weights_only=False``), which ``torch.load(weights_only=True)`` refuses. A plain state dict is read with
    ``weights_only=True``; otherwise the file is unpickled with every class it names replaced by an inert stand-in
    (only tensor rebuilders and plain containers are real), and the state dict is collected from the module tree.

    Raises:
        FileNotFoundError: no file at ``path``; the message says how to get it.
        ValueError: not a PyTorch file, or neither a state dict nor a pickled module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torchxrayvision DenseNet-121 weights not found: {path}. {XRV_HOW_TO_GET}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickled model: classes, not just tensors
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*source code")  # legacy files' source checks
                loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)
        except Exception as err:
            raise ValueError(f"{path} could not be read as a PyTorch model or state dict: {err}") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable PyTorch weights file (truncated download?): {err}") from err
    if isinstance(loaded, _Inert):
        return _module_state_dict(loaded)
    if isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    raise ValueError(
        f"{path} holds a {type(loaded).__name__}, neither a pickled DenseNet nor its state dict. {XRV_HOW_TO_GET}"
    )


def load_xrv_densenet121(weights_path: str | Path) -> XRVDenseNetFeatures:
    """torchxrayvision's ``densenet121-res224-all`` (eval mode): ``(B, 1, 224, 224)`` in [-1024, 1024] -> ``(B, 1024)``.

    ``weights_path`` is torchxrayvision's file :data:`XRV_DENSENET_WEIGHTS_NAME` or a state dict of the same model;
    it is never downloaded. Inputs come from :func:`xrv_preprocess`.

    Raises:
        FileNotFoundError: no file at ``weights_path``; the message names the URL to fetch and the flag to pass.
        ValueError: the file is not the weights of an xrv DenseNet-121 with 1 input channel and 18 outputs.
    """
    xrv_state = read_xrv_state_dict(weights_path)
    model = XRVDenseNetFeatures()
    expected = model.network.state_dict()
    state = xrv_state_dict_to_monai(xrv_state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise ValueError(
            f"{weights_path} is not torchxrayvision's DenseNet-121 ({XRV_DENSENET_WEIGHTS_NAME}): "
            f"its {len(xrv_state)} tensors do not fit the model's {len(expected)} ({details}). {XRV_HOW_TO_GET}"
        )
    # xrv files hold float32; the cast only guards against a half-precision copy.
    model.network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def xrv_feature_extractor(weights_path: str | Path, batch_size: int = 64) -> FeatureExtractor:
    """FID features of radiographs: images ``(N, 1, W, H)`` in [0, 1] (MONAI PIL layout) -> ``(N, 1024)``.

    :func:`load_xrv_densenet121` with :func:`xrv_preprocess` (transpose, centre crop, resize to 224, scale to
    [-1024, 1024]) applied to each batch. Move it with ``.to(device)``; the features come back on the CPU.
    """
    return FeatureExtractor(
        load_xrv_densenet121(weights_path), XRV_FEATURE_DIM, batch_size=batch_size, preprocess=xrv_preprocess
    )
