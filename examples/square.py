#!/usr/bin/env python3
"""A standalone program for examples/program.py: prints the square of its argument."""
import sys

n = int(sys.argv[1])
print(n * n)
