import os

# Must be set before torch is imported: with OpenMP's default busy-waiting, torch threads spinning on 2 cores that
# are shared with ALE's threads (or other processes) slow small models down by an order of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
