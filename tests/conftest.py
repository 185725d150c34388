import os
import sys

# Library warnings (no TE/Apex) are expected on CPU; keep test logs readable.
os.environ.setdefault("PYTHONWARNINGS", "ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
