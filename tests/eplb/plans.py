"""Shared checks for the EPLB tests: what makes a plan valid."""

import torch


def check_plan(weight, plan, num_replicas, num_groups, num_nodes, num_gpus):
    """Assert that ``plan`` (phy2log, log2phy, logcnt) is a valid plan for these arguments."""
    phy2log, log2phy, logcnt = plan
    num_layers, num_experts = weight.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (num_layers, num_replicas)
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape == (num_layers, num_experts, int(logcnt.max()))
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < num_experts
    # Every expert has a replica; the counts are the slots that hold it.
    assert int(logcnt.min()) >= 1
    assert torch.equal(logcnt.sum(1), torch.full((num_layers,), num_replicas))
    assert torch.equal(logcnt, torch.stack([torch.bincount(p, minlength=num_experts) for p in phy2log]))
    # log2phy lists exactly the slots of each expert, ascending, then -1.
    for layer in range(num_layers):
        for expert in range(num_experts):
            count = int(logcnt[layer, expert])
            expected = torch.nonzero(phy2log[layer] == expert).flatten()
            assert torch.equal(log2phy[layer, expert, :count], expected)
            assert bool((log2phy[layer, expert, count:] == -1).all())
    # Hierarchical: each group's replicas all on one node, groups_per_node groups per node.
    if num_groups % num_nodes == 0:
        group_size = num_experts // num_groups
        node_of_slot = torch.arange(num_replicas) // (num_replicas // num_nodes)
        for layer in range(num_layers):
            group_of_slot = phy2log[layer] // group_size
            nodes_of_group = [set(node_of_slot[group_of_slot == g].tolist()) for g in range(num_groups)]
            assert all(len(nodes) == 1 for nodes in nodes_of_group), nodes_of_group
            groups_per_node = [sum(nodes == {n} for nodes in nodes_of_group) for n in range(num_nodes)]
            assert groups_per_node == [num_groups // num_nodes] * num_nodes
