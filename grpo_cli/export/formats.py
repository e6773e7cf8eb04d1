"""The export formats by name: what `grpo export --format NAME` reads. A format is one module implementing
protocol.ExportFormat plus its line in FORMATS (docs/extending.md, "An export format")."""

from __future__ import annotations

from grpo_cli.errors import UserError
from grpo_cli.export.adapter import ADAPTER
from grpo_cli.export.gguf_format import GGUF
from grpo_cli.export.merged import SAFETENSORS
from grpo_cli.export.protocol import ExportFormat

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (SAFETENSORS, ADAPTER, GGUF)}
DEFAULT = SAFETENSORS.name


def format_named(name: str) -> ExportFormat:
    """The format --format `name` means; an unknown name is a UserError listing the formats."""
    if name not in FORMATS:
        choices = "; ".join(f"{fmt.name} ({fmt.summary})" for fmt in FORMATS.values())
        raise UserError(f"--format {name}: there is no such export format. Use one of: {choices}.")
    return FORMATS[name]
