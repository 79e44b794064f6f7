"""One DPO learner rank in this process (gloo, world size 1): which model serves the reference pass, and its
log-probs against a frozen reference loaded from the same folder. Run by test_reference_reuse.py:

    python reference_worker.py MODEL_DIR ZERO_STAGE DTYPE OUT_JSON
"""
import dataclasses
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from selfrefine_dist.refine.learner import Learner  # noqa: E402
from selfrefine_dist.refine.preference_data import collate_packed_pairs, plan_round  # noqa: E402
from selfrefine_dist.train.distributed import free_port  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_learner_group import preference_examples, spec_for  # noqa: E402

model_dir, stage, dtype, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = dataclasses.replace(spec_for(model_dir, model_dir, lr=1e-3, micro_batch_size=4), zero_stage=stage, dtype=dtype,
                           pairs_per_forward=1)
examples, tok = preference_examples(model_dir, n=8)
plan = plan_round(examples, world_size=1, micro_batch_size=4, grad_accum=1, epochs=1, seed=0)
learner = Learner(0, 1)
learner.setup(spec, "127.0.0.1", free_port())
batches = [collate_packed_pairs([ex], tok.pad_token_id) for step in plan.shards[0] for micro in step for ex in micro]


def flat(logps):
    return torch.cat(logps).tolist()


served = learner._load_reference()
result = {"round1_serves_policy": served is learner.engine, "round1": flat(learner._forward_logps(served, batches))}
frozen = learner._engine(model_dir, with_optimizer=False)
result["frozen"] = flat(learner._forward_logps(frozen, batches))
frozen.destroy()
history = learner.train_round(plan.shards[0], 1)
result["round1_run"] = list(learner.reference_sequences)
result["round1_metrics"] = [h.as_dict() for h in history]
served = learner._load_reference()
result["round2_serves_policy"] = served is learner.engine
result["round2"] = flat(learner._forward_logps(served, batches))
served.destroy()
# the same pairs again: every sequence's frozen-reference log-prob is known, no reference runs
history = learner.train_round(plan.shards[0], 2)
result["round2_run"] = list(learner.reference_sequences)
result["round2_metrics"] = [h.as_dict() for h in history]
with open(out, "w") as f:
    json.dump(result, f)
