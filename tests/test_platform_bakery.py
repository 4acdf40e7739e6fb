"""The whole loop with the real ``openai`` client, on the built-in galerne-mini: upload the
bakery example's conversations, create a fine-tuning job, poll it to success, and chat with
``fine_tuned_model``, which now knows prices the base did not, while another client chats
with the base all along (during the training, and in the same engine batches as the
fine-tuned model's requests afterwards)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server.app import create_app
from test_server import LiveServer

pytestmark = pytest.mark.slow

BAKERY = Path(__file__).resolve().parents[1] / "examples" / "bakery"
# Questions worded as in train.jsonl, and what a right answer says.
FACTS = [("What is the price of a croissant?", "1.20"), ("How much is a seeded loaf?", "3.80"),
         ("Do you deliver?", "30 euros")]


def ask(client, model: str, question: str) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=48,
                                       temperature=0)
    return r.choices[0].message.content


def test_bakery_fine_tune_through_the_openai_client(tmp_path):
    llm = LLM("galerne-mini", device="cpu")
    app = create_app(llm, ServerSettings(data_dir=str(tmp_path / "data")))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        before = {q: ask(client, "galerne-mini", q) for q, _ in FACTS}
        assert not any(fact in before[q] for q, fact in FACTS), before

        upload = client.files.create(file=open(BAKERY / "train.jsonl", "rb"), purpose="fine-tune")
        assert upload.purpose == "fine-tune" and upload.model_extra["num_lines"] == 460
        job = client.fine_tuning.jobs.create(
            model="galerne-mini", training_file=upload.id, suffix="bakery", seed=0,
            hyperparameters={"n_epochs": 5, "learning_rate_multiplier": 20, "batch_size": 1},
            extra_body={"hyperparameters": {"n_epochs": 5, "learning_rate_multiplier": 20, "batch_size": 1,
                                            "seq_len": 512, "lora_rank": 32}})

        # another client chats with the base while the job trains
        base_answers: list[str] = []
        stop = threading.Event()

        def chat_with_base() -> None:
            other = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
            while not stop.is_set():
                base_answers.append(ask(other, "galerne-mini", "Hello! Who are you?"))
                time.sleep(0.5)

        chatter = threading.Thread(target=chat_with_base)
        chatter.start()
        try:
            deadline = time.monotonic() + 900
            while job.status not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, "the job did not finish in 15 minutes"
                time.sleep(2)
                job = client.fine_tuning.jobs.retrieve(job.id)
        finally:
            stop.set()
            chatter.join()
        assert job.status == "succeeded", job.error
        assert len(base_answers) >= 3 and all(base_answers)
        metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
        losses = [e.data["train_loss"] for e in sorted(metrics, key=lambda e: e.data["step"])]
        assert losses[-1] < losses[0] / 2, losses

        # the fine-tuned model and the base, asked at once: they share the engine's batches
        answers: dict[tuple[str, str], str] = {}

        def ask_into(model: str, question: str) -> None:
            answers[model, question] = ask(client, model, question)

        threads = [threading.Thread(target=ask_into, args=(m, q)) for q, _ in FACTS
                   for m in (job.fine_tuned_model, "galerne-mini")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        learned = [q for q, fact in FACTS if fact in answers[job.fine_tuned_model, q]]
        assert len(learned) >= 2, answers
        assert all(answers["galerne-mini", q] == before[q] for q, _ in FACTS)  # the base is untouched
