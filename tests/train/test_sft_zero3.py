"""SFT on DeepSpeed ZeRO-3 with two gloo processes, through the real CLI and launcher.

One tiny Llama (built in conftest) trains on real GSM8K demonstrations. The
runs are shared by the tests of this module: a reference run, a run stopped
and resumed twice (mid-epoch and at an epoch boundary), and two runs that split
the same global batch differently.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sft_cli import run_cli, sft_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    # 24 demonstrations, global batch 8 (2 ranks x micro 2 x accumulation 2): 3 steps an epoch, 6 in all.
    run_dir = tmp_path_factory.mktemp("sft_reference")
    run_cli(run_dir, tiny_model_dir, "sft.micro_batch_size=2", "sft.grad_accum=2")
    return run_dir


def test_two_process_zero3_lowers_the_loss(reference_run):
    metrics = sft_metrics(reference_run)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    losses = [metrics[s]["loss"] for s in range(1, 7)]
    assert losses[0] > 5.0  # a random model over a 512-token vocabulary starts near ln(512) = 6.2
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(metrics[s]["tokens_per_s"] > 0 for s in metrics)
    report = json.loads((reference_run / "sft" / "data_report.json").read_text())
    assert report["demonstrations"]["kept"] == 24 and report["tokenize"]["kept"] == 24
    assert (reference_run / "config.yaml").is_file()


def test_stop_and_resume_gives_the_same_next_losses(reference_run, tiny_model_dir, tmp_path):
    args = ("sft.micro_batch_size=2", "sft.grad_accum=2")
    run_cli(tmp_path, tiny_model_dir, *args, "sft.stop_at_step=2")  # mid-epoch
    assert sorted(sft_metrics(tmp_path)) == [1, 2]
    assert not (tmp_path / "sft" / "model").exists()  # not finished: nothing exported
    run_cli(tmp_path, tiny_model_dir, *args, "sft.stop_at_step=3")  # stops at the epoch boundary
    run_cli(tmp_path, tiny_model_dir, *args)  # resumes at the start of epoch 2 and finishes
    resumed, reference = sft_metrics(tmp_path), sft_metrics(reference_run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6, abs=1e-6), step
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"])
    assert (tmp_path / "sft" / "model" / "config.json").is_file()


def test_gradient_accumulation_invariance(reference_run, tiny_model_dir, tmp_path):
    # micro-batches of 4 run as 4 forward parts on CPU (sft.examples_per_forward: null); whole_four as one
    one_by_four, four_by_one, whole_four = tmp_path / "b1xa4", tmp_path / "b4xa1", tmp_path / "b4xa1_whole"
    run_cli(one_by_four, tiny_model_dir, "sft.micro_batch_size=1", "sft.grad_accum=4", "sft.max_steps=3")
    run_cli(four_by_one, tiny_model_dir, "sft.micro_batch_size=4", "sft.grad_accum=1", "sft.max_steps=3")
    run_cli(whole_four, tiny_model_dir, "sft.micro_batch_size=4", "sft.grad_accum=1", "sft.max_steps=3",
            "sft.examples_per_forward=4")
    a, b, ref = sft_metrics(one_by_four), sft_metrics(four_by_one), sft_metrics(reference_run)
    whole = sft_metrics(whole_four)
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-3), step
        assert a[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step  # batch 2 x accumulation 2
        assert whole[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step  # padded batch = parts
        assert whole[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-3), step
        assert whole[step]["tokens_per_s"] > 0 and whole[step]["peak_rss_gib"] > 0


def test_exported_model_loads_and_generates(reference_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfrefine_dist.data.sft_dataset import build_sft_examples, collate
    from selfrefine_dist.data.sources import load_examples
    from selfrefine_dist.models.logprobs import causal_token_logprobs

    exported = reference_run / "sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(exported)
    trained = AutoModelForCausalLM.from_pretrained(exported)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any(".lora_" in k for k in trained.state_dict())

    examples, _ = build_sft_examples(load_examples("gsm8k", "offline", "test", limit=8), tokenizer, 1024)
    batch = collate(examples, tokenizer.pad_token_id)

    def mean_nll(model):
        with torch.no_grad():
            logps = causal_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        return float(-logps.sum() / batch.num_response_tokens)

    assert mean_nll(trained) < mean_nll(initial) - 0.3  # the export holds the trained weights, not the initial ones
    prompt = tokenizer("Natalia sold clips", return_tensors="pt")
    out = trained.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_vllm_loads_the_exported_model(reference_run):
    from transformers import AutoModelForCausalLM

    exported = reference_run / "sft" / "model"
    script = Path(__file__).with_name("vllm_prompt_logprobs.py")
    out = subprocess.run([sys.executable, str(script), str(exported), "Natalia sold clips to 48 of her friends"],
                         capture_output=True, text=True, timeout=600)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    # vLLM's log-probs of the prompt tokens equal transformers' on the same exported weights
    model = AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.tensor([result["token_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(torch.tensor(result["logprobs"][1:]), logps, atol=2e-3)
    assert len(result["generated"]) == 4
