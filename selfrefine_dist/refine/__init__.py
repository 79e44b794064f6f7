"""The self-refine loop: sample -> reward -> pair -> DPO -> sync weights -> evaluate.

A preference batch's path, file by file:
    records.py          ScoredPath, PreferencePair, PreferenceExample, PreferenceBatch
    scoring.py          sampled texts + gold answers -> ScoredPath (rewards)
    pairs.py            ScoredPaths of one question -> PreferencePairs (strategies, drops by reason)
    preference_data.py  pairs -> token ids -> per-rank micro-batches (put in the Ray object store)
    learner.py          a DeepSpeed ZeRO-3 rank as a Ray actor: reference log-probs, DPO steps
    learner_group.py    N learner actors in one placement group, called like one object
    driver.py           the rounds, stage by stage, resumable
"""
