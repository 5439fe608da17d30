"""Pass `teacher`: keep softmax attention beside each operator, as the teacher of attention transfer.

LoLCATs-style attention transfer trains each operator to reproduce the softmax attention output of its own
layer, *given the inputs that layer sees in the original model*. The captured graph (before `substitute`)
computes exactly those inputs, so this pass works on a copy of it:

    before:   … q, k, v, mask → sdpa → o → (rest of the layer) …
    teacher:  … q, k, v, mask → sdpa → o → (rest of the layer) …          (the model still runs softmax)
                     bindings → ops.<site>(…) → student ─┐
                                              o ─detach─→ mse(student, o) → output[i]

The copy's output is the tuple of per-site MSE losses; dead-code elimination then drops everything after the
last site (final norm, LM head), so a transfer step costs about one forward of the original model plus the
operators. The operators are the *same module objects* that `substitute` put into the converted graph (named
`ops.<site module>` in both), and the copy shares every other parameter with it: training the teacher graph
trains the converted model. Removing the teacher is dropping the copy — the converted graph never held it.

    plan = prepare(captured.gm, assignments)      # before substitute: copy the graph
    added = substitute(captured.gm, assignments)  # the converted graph, with the operators
    teacher = plan.finish(captured.gm, added)     # GraphModule: input_ids -> (mse_site0, mse_site1, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from lincompile.passes.substitute import OPS_ROOT, clean_graph, site_key


def attention_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of an operator's output against softmax attention (the teacher gets no gradient)."""
    return F.mse_loss(student.float(), teacher.detach().float())


@dataclass
class TeacherPlan:
    graph: fx.Graph
    node_map: dict  # captured-graph node -> its copy
    assignments: list
    sites: list = field(default_factory=list)  # the converted sites, in graph order (the output's order)

    def finish(self, root: fx.GraphModule, added: dict) -> fx.GraphModule:
        """Add each operator beside its softmax site in the copy; `root` holds the operators after substitute."""
        from lincompile.kernels.base import Operator

        graph, losses = self.graph, []
        for site, rule in self.assignments:
            if rule.op == "keep":
                continue
            name = f"{OPS_ROOT}.{site_key(site)}"  # what substitute named it (a module's later sites are numbered)
            op = added.get(name)
            if not isinstance(op, Operator):
                raise ValueError(f"no operator {name} in the converted graph")
            mapping, _ = type(op).bind(site)
            teacher_out = self.node_map[site.output]
            inputs = {arg: self.node_map[site.bindings[src]] for arg, src in mapping.items()}
            with graph.inserting_after(teacher_out):
                student = graph.call_module(name, kwargs=inputs)
            with graph.inserting_after(student):
                losses.append(graph.call_function(attention_mse, (student, teacher_out)))
            student.meta["lincompile_module"] = site.module
            for node in (student, losses[-1]):  # they belong to the site's layer (gradient checkpointing outlines it)
                if "nn_module_stack" in teacher_out.meta:
                    node.meta["nn_module_stack"] = dict(teacher_out.meta["nn_module_stack"])
            self.sites.append(site)
        if not losses:
            raise ValueError("no converted site: nothing to transfer")
        graph.output(tuple(losses))
        gm = fx.GraphModule(root, graph, class_name="AttentionTransfer")
        clean_graph(gm)  # drops the layers after the last site and the LM head (their dropouts included)
        return gm


def prepare(gm: fx.GraphModule, assignments) -> TeacherPlan:
    """Copy the captured graph (call before `substitute` changes it). Placeholders keep their names."""
    graph = fx.Graph()
    node_map: dict = {}
    graph.graph_copy(gm.graph, node_map)  # everything but the output node
    return TeacherPlan(graph=graph, node_map=node_map, assignments=list(assignments))
