"""``describe()``: the op x implementation table behind ``lepton kernels``."""

from __future__ import annotations

import torch

from . import registry


def _machine_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def _impl_row(impl: registry.Impl, devices: list[str]) -> tuple[str, str]:
    """(usable here, why / where) for one accelerated implementation on this machine."""
    wanted = set(impl.device_types)
    if impl.interpret_on_cpu and registry.triton_interpret():
        wanted.add("cpu")
    usable, reasons = [], []
    for device in sorted(wanted):
        if device not in devices:
            reasons.append(f"no {device} device on this machine")
            continue
        reason = impl.why_not(device, None, explicit=True)
        if reason is None:
            note = " (interpreter, explicit only)" if device == "cpu" and impl.interpret_on_cpu else ""
            usable.append(device + note)
        else:
            reasons.append(f"{device}: {reason}")
    if impl.dtypes is not None:
        reasons.append("dtypes " + ", ".join(sorted(str(d).removeprefix("torch.") for d in impl.dtypes)))
    if impl.supports is not None:
        reasons.append("some shapes fall back (supports check)")
    return ("yes: " + ", ".join(usable) if usable else "no"), "; ".join(reasons)


def rows() -> list[tuple[str, str, str, str]]:
    """(op, implementation, usable here, why not / notes) for every registered implementation."""
    devices = _machine_devices()
    table = []
    for name in registry.list_ops():
        op = registry.get_op(name)
        table.append((name, registry.EAGER, "yes: any device", "the spec; last-resort fallback"))
        for impl in op.impls:
            table.append((name, impl.name, *_impl_row(impl, devices)))
    return table


def selection_order(name: str) -> dict[str, list[str]]:
    """Device type -> implementation names in the order automatic selection tries them (as
    declared by the op's priorities; eager last), for cpu, cuda and any device type declared."""
    op = registry.get_op(name)
    devices = ["cpu", "cuda"] + sorted({d for i in op.impls for d in i.device_types} - {"cpu", "cuda"})
    return {device: op.priority_order(device) for device in devices}


def describe() -> str:
    """A plain-text table (op x implementation x usable here x why not), then the selection
    order per op and device type."""
    header = ("op", "impl", "usable here", "why not / notes")
    table = [header, *rows()]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[3]))
    lines.append("")
    lines.append("selection order (automatic: the first that is usable and supports the inputs runs)")
    for name in registry.list_ops():
        orders = ";  ".join(f"{device}: {' > '.join(order)}" for device, order in selection_order(name).items())
        lines.append(f"{name.ljust(widths[0])}  {orders}")
    from .ext import ext_summary  # the package imports describe before ext
    from .ops.quant_matmul import format_report

    lines.extend(format_report())
    lines.append(ext_summary())
    return "\n".join(lines).rstrip() + "\n"
