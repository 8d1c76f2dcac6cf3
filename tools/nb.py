#!/usr/bin/env python
"""Write an nbdev notebook from a jupytext percent script: `python tools/nb.py src.py nbs/NN_name.ipynb`.

Scratch sources live outside the repo (e.g. /tmp); the .ipynb is the source of truth once written.
`python tools/nb.py --to-py nbs/NN_name.ipynb out.py` goes the other way for editing.
"""
import sys, jupytext, nbformat

def main(argv):
    if argv[0] == '--to-py':
        nb = jupytext.read(argv[1]); jupytext.write(nb, argv[2], fmt='py:percent'); return
    src, dst = argv
    nb = jupytext.read(src, fmt='py:percent')
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    for c in nb.cells:
        c.metadata = {k: v for k, v in c.metadata.items() if k == 'tags'}
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nbformat.write(nb, dst)

if __name__ == '__main__': main(sys.argv[1:])
