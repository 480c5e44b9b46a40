"""The deterministic simulator (run as `python -m sim`; design in docs/simulator.md).

choices.py     the one recorded choice list every decision is drawn from
schedule.py    Trio's scheduling hook: batch order (native) or PCT, self-test
scenario.py    the scenarios' knobs and the plan drawn from the choice list
pipes.py       simulated byte streams (HTTP connections, runner pipes, links)
net.py         the network between nodes: PeerLinks' seams, resets, partitions
faults.py      fault points, stream shaping, the fault window
fake_runner.py a runner speaking the real protocol, seeded; ranks of a group
ledger.py      the oracle: what the fake runners really did
encoder.py     a trivial prompt encoder
http.py        a small HTTP/1.1 client and SSE / NDJSON / JSON framings
dialects.py    one reader per API dialect
clients.py     simulated clients and their behaviours
world.py       the cluster's nodes, runners, clients and faults in one run
watch.py       what crossed the cluster's seams (leaders, terms, teardowns)
invariants.py  what must hold after every run
run.py         one run: choice list in, digest and violations out
sweep.py       many runs, worker processes, coverage, mutant hunting
mutants.py     known bugs patched into the real code
shrink.py      minimising a failing choice list
replay.py      replay files and the regression corpus (corpus/)
determinism.py same digests here and in a fresh process
speedups.py    simulator-only speed-ups that change no behaviour
"""
