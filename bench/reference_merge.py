"""The Python reference for `adapter_job merge`: stock transformers + PEFT, as a user would merge.

    python bench/reference_merge.py BASE_DIR ADAPTER_DIR OUT_DIR

Loads the base in its own dtype, applies the adapter with PeftModel.from_pretrained, merge_and_unload(), and
save_pretrained (transformers' default shard size); prints the seconds of each step.
"""
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, out = sys.argv[1:4]
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
loaded = time.perf_counter()
model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
merged = time.perf_counter()
model.save_pretrained(out)
saved = time.perf_counter()
print(f"load {loaded - start:.2f} s, merge {merged - loaded:.2f} s, save {saved - merged:.2f} s, "
      f"threads {torch.get_num_threads()}")
