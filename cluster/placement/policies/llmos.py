"""llmos: FGD's fragmentation descent, with ties settled by the GPUs a node's CPU would strand.

FGD's integer score puts many nodes in one bin (a fragmentation change within about 0.04 GPU
scores the same), and FGD settles the bin by node order. That coarseness is not a weakness to
remove: scoring the exact fragmentation change instead spreads work over more nodes and loses
allocation. llmos keeps FGD's score as the first key and uses the bin to fix FGD's blind spot:
FGD counts every device big enough for a task shape as usable by it, even when the node's CPU
leaves room for one copy of the shape. The second key is the decrease of *stranded* capacity
(`TargetWorkload.stranded`): the same expected unusable GPUs, with each shape's copies limited by
the node's free CPU as well as its devices. Among nodes FGD rates the same, llmos picks the one
whose CPU and GPU stay usable together (CPU-heavy tasks to CPU-rich nodes, light ones where CPU is
scarce), on the device that best achieves it.

Online and honest: it knows only the target workload's shape distribution, as FGD does, and
scores one task at a time.
"""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy
from cluster.placement.policies.fgd import PlacementOptions, fgd_option_scores, sigmoid
from cluster.placement.request import Demand
from cluster.placement.state import ClusterState

# The second key is FGD's own transform of the stranded-capacity decrease (sigmoid of GPUs), cut
# into this many bins. Coarse on purpose: equal bins fall to the node order, which keeps work
# consolidated and whole nodes free for large gangs; a continuous key spreads work over every node
# it marginally prefers (on the trace it breaks all 39 nodes that alone can host 8-GPU, 120-CPU
# tasks within the first 5% of arrivals).
TIE_BREAK_BINS = 10


class Llmos(Policy):
    name = "llmos"
    needs_workload = True

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        options = PlacementOptions.of(self.workload, state, demand, nodes)
        fgd_score = fgd_option_scores(options, self.workload)
        # Bins are worth less than one FGD point together: 0.0, 0.09, ... 0.81 (0.9 only at +inf).
        tie_break = np.floor(sigmoid(options.decrease(self.workload.stranded)) * TIE_BREAK_BINS) * 0.09
        option_score = np.where(options.valid, fgd_score + tie_break, -1.0)
        device = option_score.argmax(axis=1)
        return NodeScores(option_score.max(axis=1), device if demand.is_fractional_gpu else None)
