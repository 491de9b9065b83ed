"""The node side of SCAFFOLD, run by fedplug after the backend's train (``fedplug.NodeStep``).

fedplug's backends train with their own loop; the correction ``c - c_i`` is constant during the
local steps, so it is applied after them as the drift ``K * lr * (c - c_i)`` over the ``K`` steps
(exact for plain SGD when the gradients do not depend on the correction; an approximation
otherwise). The client control variate is SCAFFOLD's option II: ``c_i+ = c_i - c + (x - y) / (K lr)``.
"""

import numpy as np


def step(node):
    k_lr = node.steps * float(node.config["lr"])
    x, y_plain = node.before, node.after
    c = node.sent["control"]
    c_i = {key: node.state.get(key, np.zeros_like(value)) for key, value in x.items()}
    y = {key: (y_plain[key] - k_lr * (c[key] - c_i[key])).astype(x[key].dtype) for key in x}
    c_new = {key: (c_i[key] - c[key] + (x[key] - y[key]) / k_lr).astype(x[key].dtype) for key in x}
    node.after = y
    node.reply["control"] = {key: c_new[key] - c_i[key] for key in x}
    node.state.clear()
    node.state.update(c_new)
