"""``quantization_config`` of a GPTQ / AWQ checkpoint's config.json -> a checked QuantSpec.

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
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_METHODS = ("gptq", "awq")
GPTQ_GROUP_SIZES = (32, 64, 128, -1)
AWQ_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's Linear weights are quantized."""

    method: str              # "gptq" or "awq"
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
        if self.method == "gptq":
            extras.append("symmetric" if self.sym else "asymmetric")
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
    raise _refuse("quant_method", method, "lepton reads gptq and awq checkpoints")


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
