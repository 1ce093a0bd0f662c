import os, time, torch, psutil
os.environ["MEG_HOME"] = "/tmp/bl/home"
torch.set_num_threads(1)
from meg import lm, facts
from meg.baselines.targets import TargetConfig, target_vectors
loaded = lm.load_model()
edits = facts.load_benchmark("counterfact", "train")[:16]
t0 = time.time()
res = target_vectors(loaded, edits, 8, TargetConfig(), None, progress=False)
print("z", time.time() - t0, "rss", psutil.Process().memory_info().rss / 2**20)
print([round(float(r["loss"]), 3) for r in res.values()], [int(r["steps"]) for r in res.values()])
