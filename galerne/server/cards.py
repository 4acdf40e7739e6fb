"""The model cards ``/v1/models`` answers: the base's, a served adapter's, and a fine-tuned
model's from the registry. Each is Mistral's card (``BaseModelCard``, ``FTModelCard``), a
superset of OpenAI's model object; the fine-tuned kinds add vLLM's ``parent``."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..engine.adapters import AdapterInfo
from ..errors import GalerneError
from ..sampling.params import MISTRAL_DEFAULT_TEMPERATURE
from .state import ServerState


def model_card(server: ServerState) -> dict:
    """Mistral's base-model card, a superset of OpenAI's model object (made once)."""
    if server.card is not None:
        return server.card
    tok = server.tokenizer
    try:
        tok.encode_fim("a", "b")
        fim = True
    except GalerneError:
        fim = False
    server.card = {
        "id": server.model_id, "object": "model", "created": server.created, "owned_by": "galerne", "type": "base",
        "name": server.model_id, "description": f"{server.model_id} served by galerne {__version__}",
        "max_context_length": server.max_model_len, "aliases": server.model_ids[1:],
        "capabilities": {"completion_chat": True, "completion_fim": fim,
                         "function_calling": tok.special_token_id("[TOOL_CALLS]") is not None,
                         "fine_tuning": False, "classification": False,
                         "vision": server.llm.vision is not None and tok.takes_images},
        "default_model_temperature": MISTRAL_DEFAULT_TEMPERATURE, "deprecation": None,
    }
    return server.card


def _tuned_card(server: ServerState, *, id: str, created: int, name: str, description: str | None, job: str,
                root: str, archived: bool) -> dict[str, Any]:
    """A fine-tuned model's card (``root``, and ``parent`` for OpenAI-style clients: its base);
    its capabilities are the base's."""
    base = model_card(server)
    return {
        "id": id, "object": "model", "created": created, "owned_by": "galerne", "type": "fine-tuned",
        "name": name, "description": description, "max_context_length": server.max_model_len, "aliases": [],
        "capabilities": dict(base["capabilities"]), "default_model_temperature": base["default_model_temperature"],
        "deprecation": None, "job": job, "root": root, "parent": root, "archived": archived,
    }


def adapter_card(server: ServerState, info: AdapterInfo) -> dict[str, Any]:
    """An adapter served unmerged (--lora, /v1/load_lora_adapter)."""
    return _tuned_card(server, id=info.name, created=server.created, name=info.name,
                       description=f"LoRA adapter (rank {info.rank}, {info.layout} layout) on {server.model_id}",
                       job="", root=server.model_id, archived=False)


def ft_card(server: ServerState, row: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuned model of the registry (a fine-tuning job's result), served or archived."""
    return _tuned_card(server, id=row["id"], created=row["created_at"], name=row.get("name") or row["id"],
                       description=row.get("description"), job=row.get("job_id") or "", root=row["base"],
                       archived=bool(row["archived"]))
