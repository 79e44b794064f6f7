"""One of two DPO learner ranks (gloo, ZeRO-3) whose shards hold unequally many new sequences: rank 0
four distinct pairs, rank 1 one pair four times. Run by test_reference_cache.py:

    python uneven_reference_worker.py MODEL_DIR RANK PORT OUT_JSON

Each rank writes the reference log-probs the reference pass gave its pairs and those a forward of
each pair (the same model, the collate of training) gives; the run finishing at all shows the ranks
ran the same number of forwards (a ZeRO-3 forward gathers weights from every rank).
"""
import dataclasses
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from selfrefine_dist.refine.learner import Learner  # noqa: E402
from selfrefine_dist.refine.preference_data import collate_packed_pairs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_learner_group import preference_examples, spec_for  # noqa: E402

model_dir, rank, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = dataclasses.replace(spec_for(model_dir, model_dir, micro_batch_size=4), zero_stage=3, pairs_per_forward=1)
examples, tok = preference_examples(model_dir, n=8)
pairs = examples[:4] if rank == 0 else [examples[4]] * 4
shard = [[pairs]]  # one step, one micro-batch of 4 pairs
learner = Learner(rank, 2)
learner.setup(spec, "127.0.0.1", port)
chosen, rejected = learner._reference_logps(shard, tok.pad_token_id)[0][0]
run = list(learner.reference_sequences)
direct = learner._forward_logps(learner.engine, [collate_packed_pairs([ex], tok.pad_token_id) for ex in pairs])
history = learner.train_round(shard, 1)  # the same pairs in a round: their values known, then a step
with open(out, "w") as f:
    json.dump({"chosen": chosen.tolist(), "rejected": rejected.tolist(), "run": run,
               "run_in_round": list(learner.reference_sequences),
               "direct": torch.stack(direct).tolist(), "loss": history[0].loss}, f)
