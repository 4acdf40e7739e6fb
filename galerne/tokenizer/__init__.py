"""Tokenizers: one small API over Mistral tokenizers (tekken, SentencePiece) and HF tokenizer.json.

* ``base``: the ``Tokenizer`` interface and ``Tokenizer.from_path`` (which file of a folder);
* ``mistral``: tekken.json and tokenizer.model[.vN] through mistral-common (chat, tools, FIM);
* ``hf``: tokenizer.json with the folder's own Jinja chat template, as transformers renders it;
* ``detokenizer``: ``IncrementalDetokenizer``, generated ids to text as they arrive, exactly;
* ``toolcalls``: ``ToolCallParser``, the model's tool calls from its output ids;
* ``answer``: ``AnswerParser``, an answer's thinking (``[THINK]...[/THINK]``), content
  and tool calls from its output ids.

Callers use the public accessors (``special_token_id``, ``tool_call_format``, ``thinks``,
``mistral_tokenizer``, ``hf_tokenizer``), never the wrapped objects' internals.
"""

from .base import Tokenizer
from .detokenizer import IncrementalDetokenizer
from .hf import HFTokenizer
from .mistral import MistralCommonTokenizer

__all__ = ["HFTokenizer", "IncrementalDetokenizer", "MistralCommonTokenizer", "Tokenizer"]
