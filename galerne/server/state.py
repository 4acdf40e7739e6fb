"""What the routes share: the model, its engine, the settings, the counters.
One per app, on ``app.state.server`` (no module-level state)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import ServerSettings
from ..engine.adapters import AdapterInfo
from ..engine.async_engine import AsyncEngine
from ..engine.request import Limits
from ..images import ImagePolicy
from ..llm import LLM
from ..platform import Platform
from ..platform.supervisor import Supervisor
from .errors import ModelNotFound
from .metrics import Metrics

if TYPE_CHECKING:  # the runner imports this module
    from .batch.runner import BatchRunner


@dataclass
class ServerState:
    llm: LLM
    settings: ServerSettings
    model_ids: list[str]  # the first is the id; the others are aliases
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    engine: AsyncEngine | None = None  # started by the lifespan
    in_flight: int = 0  # HTTP requests being answered (streams until their last byte)
    queued: int = 0  # engine requests admitted that have no token yet
    draining: bool = False
    idle: asyncio.Event | None = None  # set when in_flight falls to 0
    card: dict | None = None  # the model card, made on first use
    lora_dirs: list = field(default_factory=list)  # --lora-dir, resolved (adapters.py)
    loading: set[str] = field(default_factory=set)  # adapter names being loaded (their files being read)
    max_adapter_bytes: int | None = None  # the largest adapter file taken, made on first use (adapters.py)
    platform: Platform | None = None  # files, jobs, fine-tuned models (galerne.platform)
    jobs: Supervisor | None = None  # starts fine-tuning workers, serves their models (started by the lifespan)
    batches: BatchRunner | None = None  # the batch runner (server/batch/runner.py), started by the lifespan

    @property
    def model_id(self) -> str:
        return self.model_ids[0]

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def image_policy(self) -> ImagePolicy:
        """What a request's images may be (--allow-image-urls, --max-image-mb)."""
        s = self.settings
        return ImagePolicy(allow_urls=s.allow_image_urls, max_bytes=int(s.max_image_mb * 2**20),
                           timeout_s=s.image_url_timeout)

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def limits(self) -> Limits:
        """What the routes validate requests against (``validate_request``)."""
        return self.llm.limits

    def adapters(self) -> tuple[AdapterInfo, ...]:
        """The adapters served unmerged, as the engine thread last published them (before
        the engine starts: as the LLM has them)."""
        return self.engine.adapters() if self.engine is not None else tuple(self.llm.adapters())

    def adapter(self, name: str) -> AdapterInfo | None:
        """The loaded adapter named ``name``, from one snapshot of ``adapters``, or None."""
        return next((a for a in self.adapters() if a.name == name), None)

    def check_model(self, model: str) -> tuple[str, str | None]:
        """(the id answers show, the adapter to run through or None) of a request's
        ``model``: the base (by its id or an alias) or a loaded adapter (by its name)."""
        if model in self.model_ids:
            return self.model_id, None
        if self.adapter(model) is not None:
            return model, model
        raise self.not_found(model)

    def not_found(self, model: str) -> ModelNotFound:
        """The 404 of an unknown model, listing the base's ids and the adapters' names."""
        return ModelNotFound(model, self.model_ids + [a.name for a in self.adapters()])

    def engine_stats(self) -> dict | None:
        """The AsyncEngine's last published snapshot (None when it is not started)."""
        return None if self.engine is None else self.engine.stats()
