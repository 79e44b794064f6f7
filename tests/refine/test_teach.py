"""The teacher stage: demonstrations generated, checked against gold, written as the SFT input.

The OpenAI-compatible endpoint is served by a small HTTP server in the test (no model server
can be reached from here); it answers like a teacher that is right on even-numbered questions.
The sampler-actor teacher runs for real (a tiny model on the HF backend).
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.data.demonstrations import demonstrations_path, read_demonstrations
from selfrefine_dist.refine.teach import run_teach_stage

QUESTIONS = load_examples("gsm8k", "offline", "test", limit=6)


class TeacherHandler(BaseHTTPRequestHandler):
    requests_seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        TeacherHandler.requests_seen.append((self.path, body, self.headers.get("Authorization")))
        prompt = body["messages"][0]["content"]
        index = next(i for i, q in enumerate(QUESTIONS) if q.question.strip() in prompt)
        answer = QUESTIONS[index].answer if index % 2 == 0 else "-1"
        reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": f"Step by step: done. The answer is {answer}."},
                              "finish_reason": "stop"}],
                 "usage": {"completion_tokens": 9}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), TeacherHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_endpoint_teacher_keeps_only_correct_demonstrations(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "secret")
    cfg = load_config(None, ["teach.enabled=true", f"teach.endpoint={endpoint}", "teach.endpoint_model=big",
                             "teach.api_key_env=TEACHER_KEY",
                             "data.train=[{task: gsm8k, source: offline, split: test, limit: 6}]"])
    out = run_teach_stage(cfg, tmp_path)
    kept = read_demonstrations(out)
    assert [ex.uid for ex in kept] == [QUESTIONS[i].uid for i in (0, 2, 4)]
    assert all(ex.rationale.endswith(f"The answer is {ex.answer}.") for ex in kept)
    report = json.loads((out.parent / "report.json").read_text())
    assert report == {"questions": 6, "kept": 3, "dropped": {"wrong": 3}}
    path, body, auth = TeacherHandler.requests_seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "big" and auth == "Bearer secret"
    # a finished stage is not redone
    n = len(TeacherHandler.requests_seen)
    run_teach_stage(cfg, tmp_path)
    assert len(TeacherHandler.requests_seen) == n


@pytest.mark.slow
def test_model_teacher_on_sampler_actors(tiny_model_dir, tmp_path):
    import ray

    cfg = load_config(None, ["teach.enabled=true", f"teach.model={tiny_model_dir}", "teach.samples_per_question=2",
                             "teach.temperature=1.0", "teach.max_new_tokens=16", "sampler.backend=hf",
                             "sampler.num_actors=2", "sampler.chunk_size=2", "model.dtype=fp32", "ray.num_cpus=4",
                             "data.train=[{task: gsm8k, source: offline, split: test, limit: 5}]"])
    try:
        run_teach_stage(cfg, tmp_path)
    finally:
        ray.shutdown()
    report = json.loads((demonstrations_path(tmp_path).parent / "report.json").read_text())
    kept = read_demonstrations(demonstrations_path(tmp_path))
    assert report["questions"] == 5 and report["kept"] == len(kept)
    assert report["kept"] + sum(report["dropped"].values()) == 5
