import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                     # tests/helpers.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # the method files
