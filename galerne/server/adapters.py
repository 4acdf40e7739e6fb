"""LoRA adapters served unmerged, managed over the API with vLLM's routes and bodies:

    POST /v1/load_lora_adapter    {"lora_name": "a", "lora_path": "team-a/adapter"}
    POST /v1/unload_lora_adapter  {"lora_name": "a"}
    GET  /v1/lora_adapters

A loaded adapter is a model: ``/v1/models`` shows it (``"parent"``: the base), and a
request picks it with ``"model": "a"`` (``ServerState.check_model``).

A load never makes other clients wait: the path checks and the reading of the
files (``AdapterManager.read``: parsing, shape checks, copies) run in a worker
thread; only the registration (``AdapterManager.add``, a few dict updates, and the
slots' allocation on the first load) runs on the engine thread, between two steps,
through the AsyncEngine's input queue (``AsyncEngine.call``). An unload goes the
same way: the name is refused from then on, the requests already running through
it finish, and its memory goes with the last of them.

Run-time loads read only inside the ``--lora-dir`` folders (none given: run-time
loading is off). The path given is resolved first (symlinks, ``..``), and so are the
files the reader will open in it, so that a link inside an allowed folder cannot
lead outside; a weights file larger than any adapter of this base at
``max_lora_rank`` could be is refused before it is read. ``--lora NAME=PATH`` at
startup (create_app) may name any path: the operator gave it.

Status codes are vLLM's where it has one: 200 with a plain-text line on success,
400 for a bad adapter or a name already loaded, 404 for an unknown name or nothing
at the path; plus 403 for a path outside ``--lora-dir``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from ..config import ADAPTER_NAME, ADAPTER_NAME_RULE
from ..engine.adapters import AdapterInfo
from ..errors import GalerneError, InvalidParameter, ModelLoadError
from ..models.lora import MULTI_TARGETS
from ..weights.adapters import AdapterWeights, adapter_files
from .auth import require_api_key
from .errors import AdapterInvalid, AdapterNotFound, Forbidden, ShuttingDown
from .mistral.routes import body_schema
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .serving import read_request
from .state import ServerState

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["adapters"])

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json, params.json: a few hundred bytes in practice
BYTES_PER_VALUE = 8  # the widest dtype an adapter file may hold its values in (float64)
HEADER_BYTES = 16 << 20  # a safetensors header (names, shapes, metadata), generously


@router.post("/v1/load_lora_adapter", summary="Load a LoRA adapter, served unmerged under a name (vLLM's route)",
             response_class=PlainTextResponse, openapi_extra=body_schema("LoadLoRAAdapterRequest"))
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    req = await read_request(request, LoadLoRAAdapterRequest)
    server: ServerState = request.app.state.server
    name = req.lora_name
    check_name(server, name, "lora_name")
    if server.draining:
        raise ShuttingDown("the server is shutting down")
    if not server.lora_dirs:
        raise Forbidden("loading adapters at run time is off: start the server with --lora-dir DIR (repeatable) "
                        "to allow loading the adapters under DIR, or give them at startup with --lora NAME=PATH",
                        code="runtime_loading_disabled", field="lora_path")
    if name in server.loading or server.adapter(name) is not None:
        raise name_taken(name)
    server.loading.add(name)  # a second load of this name is refused while the files are read
    try:
        weights = await asyncio.to_thread(read_allowed, server, req.lora_path)
        await server.engine.call(lambda engine: _add(engine, name, weights))
    finally:
        server.loading.discard(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", summary="Stop serving a LoRA adapter (vLLM's route)",
             response_class=PlainTextResponse, openapi_extra=body_schema("UnloadLoRAAdapterRequest"))
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    req = await read_request(request, UnloadLoRAAdapterRequest)
    server: ServerState = request.app.state.server
    name = req.lora_name
    if server.adapter(name) is None:
        raise not_loaded(name)
    await server.engine.call(lambda engine: _unload(engine, name))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@router.get("/v1/lora_adapters", summary="The LoRA adapters served unmerged")
async def list_lora_adapters(request: Request) -> dict:
    server: ServerState = request.app.state.server
    return {"object": "list", "data": [describe(server, a) for a in server.adapters()]}


def describe(server: ServerState, info: AdapterInfo) -> dict:
    return {"name": info.name, "path": info.path, "layout": info.layout, "rank": info.rank, "scaling": info.scaling,
            "targets": list(info.targets), "parent": server.model_id}


# ------------------------------------------------------------------ names


def check_name(server: ServerState, name: str, field: str) -> None:
    """An adapter's name becomes a model id: it follows ``config.ADAPTER_NAME`` and is not
    the base's id nor one of its aliases."""
    if not ADAPTER_NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidParameter(field, f"an adapter's name must be {ADAPTER_NAME_RULE}, got {shown!r}")
    if name in server.model_ids:
        raise InvalidParameter(field, f"{name!r} is the base model's id (or an alias): give the adapter another name")


def name_taken(name: str) -> AdapterInvalid:
    return AdapterInvalid(f"The lora adapter '{name}' has already been loaded; unload it first to load it again",
                          "lora_name", code="adapter_exists")


def not_loaded(name: str) -> AdapterNotFound:
    return AdapterNotFound(f"The lora adapter '{name}' cannot be found.", "lora_name")


# ------------------------------------------------------------------ on the engine thread


def _add(engine, name: str, weights: AdapterWeights) -> AdapterInfo:
    try:
        return engine.adapters.add(name, weights)
    except InvalidParameter:  # the only one add raises past check_name: loaded meanwhile (another load won)
        raise name_taken(name) from None
    except ModelLoadError as e:  # the slots could not be made (out of memory)
        raise AdapterInvalid(str(e), "lora_path", code="adapter_slots") from None


def _unload(engine, name: str) -> None:
    try:
        engine.adapters.unload(name)
    except InvalidParameter:  # unloaded meanwhile
        raise not_loaded(name) from None


# ------------------------------------------------------------------ paths (a worker thread)


def read_allowed(server: ServerState, raw: str) -> AdapterWeights:
    """The adapter at ``raw`` (a client's ``lora_path``), read after checking that every
    file it takes lies inside a ``--lora-dir`` folder. Every refusal is a 4xx that says
    why: nothing outside those folders is read, nor even said to exist."""
    path = allowed_path(raw, server.lora_dirs)
    try:
        layout, weights_file, config = adapter_files(path)
    except ModelLoadError as e:
        raise AdapterInvalid(str(e), "lora_path") from None
    files = [weights_file] + ([config] if config is not None else [])
    if layout == "mistral":  # the reader may take the scaling from a params.json beside it
        files.append(weights_file.parent / "params.json")
    limit = max_adapter_bytes(server)
    for f in files:
        if not os.path.lexists(f):
            continue  # the reader says what is missing
        real = _resolve(f, raw)
        if not _inside(real, server.lora_dirs):
            raise _outside(raw, f"its file {f.name} links outside them")
        size = real.stat().st_size if real.is_file() else 0
        cap = limit if f == weights_file else MAX_CONFIG_BYTES
        if size > cap:
            raise AdapterInvalid(f"{f.name} is {size / 2**20:.1f} MiB, more than an adapter of this model up to rank "
                                 f"{server.llm.engine.adapters.max_rank} (max_lora_rank) can hold "
                                 f"({cap / 2**20:.1f} MiB)", "lora_path", code="adapter_too_large")
    try:
        return server.llm.engine.adapters.read(path)
    except GalerneError as e:
        if isinstance(e, ModelLoadError):
            raise AdapterInvalid(str(e), "lora_path") from None
        raise
    except Exception as e:  # a malformed file the reader did not foresee: still the adapter's fault
        log.warning("adapter %s: unexpected error while reading it", path, exc_info=True)
        raise AdapterInvalid(f"{path}: cannot read this adapter ({type(e).__name__}: {e})", "lora_path") from None


def allowed_path(raw: str, dirs: list[Path]) -> Path:
    """``raw`` resolved (symlinks, ``..``) and checked to lie inside one of ``dirs`` (a
    relative path: in the first of ``dirs`` where it exists). 403 outside them, whether
    or not it exists there; 404 inside them when nothing is there; 400 when it is not a
    folder nor a regular file."""
    if not raw or len(raw) > MAX_PATH_CHARS or not raw.isprintable():
        shown = raw if len(raw) <= 80 else raw[:80] + "..."
        raise InvalidParameter("lora_path", f"must be a path of 1 to {MAX_PATH_CHARS} printable characters, "
                                            f"got {shown!r}")
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [d / given for d in dirs]
    found = None
    for candidate in candidates:
        real = _resolve(candidate, raw)
        if not _inside(real, dirs):
            raise _outside(raw, "symlinks and '..' resolved")
        if found is None and os.path.lexists(real):
            found = real
    if found is None:
        raise AdapterNotFound(f"no adapter at {raw!r}: nothing there (in the folders given by --lora-dir)",
                              "lora_path")
    if not (found.is_dir() or found.is_file()):
        raise AdapterInvalid(f"{raw!r} is neither a folder nor a regular file", "lora_path")
    return found


def _resolve(path: Path, raw: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise AdapterInvalid(f"cannot resolve {raw!r}: {getattr(e, 'strerror', None) or e}", "lora_path") from None


def _inside(real: Path, dirs: list[Path]) -> bool:
    return any(real == d or real.is_relative_to(d) for d in dirs)


def _outside(raw: str, why: str) -> Forbidden:
    more = f" ({why})" if why else ""
    return Forbidden(f"{raw!r} is not inside the folders adapters may be loaded from (--lora-dir){more}",
                     code="adapter_path_not_allowed", field="lora_path")


def max_adapter_bytes(server: ServerState) -> int:
    """The largest weights file an adapter of this base may have: rank ``max_lora_rank``
    on every layer served with adapters, each value in the widest dtype, plus a header."""
    if server.max_adapter_bytes is None:
        model, rank = server.llm.model, server.llm.engine.adapters.max_rank
        values = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                     if name.startswith("layers.") and name.rpartition(".")[2] in MULTI_TARGETS
                     and hasattr(m, "in_features"))
        server.max_adapter_bytes = values * BYTES_PER_VALUE + HEADER_BYTES
    return server.max_adapter_bytes
