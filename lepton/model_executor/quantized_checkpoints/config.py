"""``quantization_config`` of a GPTQ / AWQ / compressed-tensors checkpoint's config.json -> a
checked QuantSpec.

Only what the readers repack is accepted; any other variant is refused here, when config.json is
read, with the field that names it (e.g. ``quantization_config.bits``), before weights load.

GPTQ (AutoGPTQ / GPTQModel, quant_method "gptq"):
    bits 4 or 8; group_size 32, 64, 128 or -1 (one group per row); desc_act (act-order, needs
    g_idx); sym (either way the zero points are stored); checkpoint_format "gptq" (v1: stored
    zero = real zero - 1) or "gptq_v2" (GPTQModel's "format" key is read where
    "checkpoint_format" is absent). Refused: other bits, marlin / bitblas / ipex formats,
    a quantized lm_head, GPTQModel's per-module "dynamic" overrides.
AWQ (AutoAWQ, quant_method "awq"): version "gemm", 4 bits ("bits" or AutoAWQ's "w_bit"), group
    32 / 64 / 128 ("group_size" or "q_group_size"), zero_point true. Refused: gemv, gemv_fast,
    exllama, ipex, marlin versions; the llm-awq backend (another packing).
compressed-tensors (llm-compressor, quant_method "compressed-tensors"): format "pack-quantized",
    one config group targeting ["Linear"] whose weights are int, 4 or 8 bits, static, strategy
    "group" (group_size 32 / 64 / 128, or larger and equal to every layer's K) or "channel",
    symmetric or not; actorder "weight" is accepted (it changes calibration, not the layout).
    Refused: other formats (float-quantized, naive-quantized, marlin-24, nvfp4, ...), quantized
    activations, dynamic or other strategies, actorder "group" (weight_g_idx), a KV-cache
    scheme, sparsity and transform configs, more than one config group, other targets.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors")
GPTQ_GROUP_SIZES = (32, 64, 128, -1)
AWQ_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's Linear weights are quantized."""

    method: str              # "gptq", "awq" or "compressed-tensors"
    bits: int                # 4 or 8
    group_size: int          # inputs per scale; -1: one group per row
    desc_act: bool = False   # GPTQ act-order: g_idx permutes the inputs
    sym: bool = True
    v1_zeros: bool = False   # GPTQ checkpoint_format "gptq": real zero = stored + 1 (mod 2^bits)

    def describe(self) -> str:
        """e.g. 'gptq (4-bit, group 128, act-order)'."""
        group = "one group per row" if self.group_size == -1 else f"group {self.group_size}"
        extras = [f"{self.bits}-bit", group]
        if self.desc_act:
            extras.append("act-order")
        if self.method != "awq":   # AWQ is always asymmetric
            extras.append("symmetric" if self.sym else "asymmetric")
        if self.method == "gptq":
            extras.append("v1 format" if self.v1_zeros else "v2 format")
        return f"{self.method} ({', '.join(extras)})"


def _field(qc: dict, *names: str, default=None):
    """The first of ``names`` present in qc (AutoAWQ and transformers spell some differently)."""
    return next((qc[n] for n in names if qc.get(n) is not None), default)


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"quantization_config.{field} = {value!r} is not supported: {why}")


def _flag(qc: dict, field: str, default: bool) -> bool:
    value = qc.get(field, default)
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config.{field} must be true or false, got {value!r}")
    return value


def _gptq(qc: dict) -> QuantSpec:
    bits = qc.get("bits")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise _refuse("bits", bits, "lepton reads 4- and 8-bit GPTQ checkpoints")
    group = qc.get("group_size", -1)
    if group not in GPTQ_GROUP_SIZES or isinstance(group, bool):
        raise _refuse("group_size", group, f"GPTQ group sizes read: {GPTQ_GROUP_SIZES}")
    fmt = _field(qc, "checkpoint_format", "format", default="gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse("checkpoint_format", fmt, "lepton reads the 'gptq' (v1) and 'gptq_v2' "
                      "layouts; kernel-specific ones (marlin, bitblas, ipex, ...) are not repacked")
    if qc.get("is_marlin_format"):
        raise _refuse("is_marlin_format", True, "marlin-packed weights are not repacked")
    if qc.get("lm_head"):
        raise _refuse("lm_head", True, "a quantized LM head (lepton keeps heads in float)")
    if qc.get("dynamic"):
        raise _refuse("dynamic", "{...}", "per-module bits / group overrides")
    return QuantSpec("gptq", bits, group, _flag(qc, "desc_act", False), _flag(qc, "sym", True),
                     v1_zeros=fmt == "gptq")


def _awq(qc: dict) -> QuantSpec:
    version = str(_field(qc, "version", default="gemm"))
    if version.lower() != "gemm":
        raise _refuse("version", version, "lepton reads AWQ's GEMM packing only (not gemv, "
                      "gemv_fast, exllama, ipex or marlin)")
    if qc.get("backend") == "llm-awq":
        raise _refuse("backend", "llm-awq", "llm-awq packs differently from AutoAWQ's GEMM")
    bits = _field(qc, "bits", "w_bit", default=4)
    if bits != 4 or isinstance(bits, bool):
        raise _refuse("bits", bits, "AWQ checkpoints are read in 4 bits only")
    group = _field(qc, "group_size", "q_group_size", default=128)
    if group not in AWQ_GROUP_SIZES or isinstance(group, bool):
        raise _refuse("group_size", group, f"AWQ group sizes read: {AWQ_GROUP_SIZES}")
    if not _flag(qc, "zero_point", True):
        raise _refuse("zero_point", False, "AWQ GEMM weights without zero points")
    return QuantSpec("awq", 4, group, sym=False)


def _compressed_tensors(qc: dict) -> QuantSpec:
    # Field names and defaults: compressed-tensors' QuantizationConfig, QuantizationScheme and
    # QuantizationArgs (compressed_tensors/quantization/quant_config.py, quant_scheme.py,
    # quant_args.py), as llm-compressor serializes them.
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse("quantization_status", status, "only compressed (packed) weights are read")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise _refuse(key, "{...}", "sparse or rotated weights need more than a repack")
    if qc.get("kv_cache_scheme") is not None:
        raise _refuse("kv_cache_scheme", "{...}", "lepton keeps the KV cache in float")
    # The layers in "ignore" need nothing here: the checkpoint stores them as plain .weight.
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ValueError(f"quantization_config.ignore must be a list of module names, "
                         f"got {ignore!r}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _refuse("config_groups", groups, "lepton reads one scheme for every Linear layer")
    (name, scheme), = groups.items()
    where = f"config_groups.{name}"
    if not isinstance(scheme, dict):
        raise _refuse(where, scheme, "expected a scheme object (targets, weights, ...)")
    fmt_field = f"{where}.format" if scheme.get("format") else "format"
    fmt = scheme.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise _refuse(fmt_field, fmt, "lepton reads int weights in the pack-quantized format")
    if scheme.get("targets") != ["Linear"]:
        raise _refuse(f"{where}.targets", scheme.get("targets"), 'lepton reads ["Linear"]')
    for key in ("input_activations", "output_activations"):
        if scheme.get(key) is not None:
            raise _refuse(f"{where}.{key}", "{...}", "activations stay in float (weight-only)")
    if not isinstance(scheme.get("weights"), dict):
        raise _refuse(f"{where}.weights", scheme.get("weights"), "expected the weights' "
                      "quantization arguments")
    return _compressed_tensors_weights(scheme["weights"], f"{where}.weights")


def _compressed_tensors_weights(w: dict, where: str) -> QuantSpec:
    """A scheme's ``weights`` (QuantizationArgs) -> QuantSpec; ``where`` is its field path."""
    if str(w.get("type", "int")).lower() != "int":
        raise _refuse(f"{where}.type", w["type"], "lepton reads int weights")
    bits = w.get("num_bits")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise _refuse(f"{where}.num_bits", bits, "lepton reads 4- and 8-bit weights")
    if w.get("dynamic", False) is not False:
        raise _refuse(f"{where}.dynamic", w["dynamic"], "weights must be static")
    if w.get("actorder") not in (None, False, "weight", "static"):
        raise _refuse(f"{where}.actorder", w["actorder"], "activation-ordered groups "
                      "(weight_g_idx) are not read; 'weight' or none is")
    group = w.get("group_size")
    # As QuantizationArgs infers it: group_size > 0 means "group", -1 "channel", none "tensor".
    strategy = str(w.get("strategy") or {None: "tensor", -1: "channel"}.get(group, "group")).lower()
    if strategy == "channel":
        if group not in (None, -1):
            raise _refuse(f"{where}.group_size", group, "strategy 'channel' has no groups")
        group = -1
    elif strategy != "group":
        raise _refuse(f"{where}.strategy", strategy, "lepton reads group and channel")
    elif not isinstance(group, int) or isinstance(group, bool) or not (
            group in (32, 64, 128) or group > 128 and group % 32 == 0):
        raise _refuse(f"{where}.group_size", group, "lepton reads groups of 32, 64 or 128, "
                      "or one group per row of a multiple of 32 inputs")
    sym = w.get("symmetric", True)
    if not isinstance(sym, bool):
        raise ValueError(f"quantization_config.{where}.symmetric must be true or false, "
                         f"got {sym!r}")
    return QuantSpec("compressed-tensors", bits, group, sym=sym)


def read_quant_spec(config: dict) -> QuantSpec | None:
    """config.json's quantization_config as a QuantSpec; None for a float checkpoint.
    ValueError naming the field for anything lepton cannot repack."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _refuse("quant_method", method,
                  "lepton reads gptq, awq and compressed-tensors checkpoints")


def describe_quantization(config: dict, quantization: str | None) -> str:
    """The quantization a model serves with, for the startup log: the checkpoint's method, or
    what ``quantization=`` does at load (int8 / int4), or 'none'."""
    spec = read_quant_spec(config)
    if spec is not None:
        return spec.describe()
    if quantization == "int8":
        return "int8 (per output channel, quantized at load)"
    if quantization == "int4":
        return "int4 (groups of 128, 64 or 32, quantized at load)"
    return "none"
