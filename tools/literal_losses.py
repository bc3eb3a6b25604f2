"""The contrastive losses written literally, one sample and one term at a time: the oracles that the
tests hold contragan.py's vectorised losses to (float64, values and gradients) and that tools/bench.py
times. Slow on purpose; never used for training."""
import torch
import torch.nn.functional as F


def literal_2c(embed, proxy, labels, t=1.0, data_positives=True):
    """The 2C loss straight from the paper's equation (ContraGAN, Section 3). data_positives=False: the
    authors' pos_collected_numerator=False, the proxy alone in the numerator."""
    l = [x / x.norm() for x in embed]
    e = [x / x.norm() for x in proxy]
    m = len(l)
    losses = []
    for i in range(m):
        data_to_class = torch.exp(l[i] @ e[i] / t)
        positives = sum((torch.exp(l[i] @ l[k] / t) for k in range(m) if k != i and labels[k] == labels[i]),
                        torch.zeros((), dtype=embed.dtype))
        everyone = sum((torch.exp(l[i] @ l[k] / t) for k in range(m) if k != i), torch.zeros((), dtype=embed.dtype))
        numerator = data_to_class + positives if data_positives else data_to_class
        losses.append(-torch.log(numerator / (data_to_class + everyone)))
    return sum(losses) / m


def literal_d2dce(embed, proxy, labels, t=0.5, m_p=0.98):
    """D2D-CE as the authors' code computes it (PyTorch-StudioGAN src/utils/losses.py,
    Data2DataCrossEntropyLoss.forward, commit 947b35e), one anchor i at a time: s_ij = (cos(l_i, l_j) + m_p
    - 1) / t for j != i; M_i = max_j s_ij (detached); negatives y_j != y_i, each exp(relu(s_ij) - M_i);
    a_i = relu((m_p - cos(l_i, e_i)) / t); loss_i = a_i + log(exp(-a_i) + sum of negatives)."""
    m = len(embed)
    losses = []
    for i in range(m):
        s = {j: (F.cosine_similarity(embed[i], embed[j], dim=0) + m_p - 1) / t for j in range(m) if j != i}
        M = max(s.values()).detach()
        negatives = sum((torch.exp(torch.relu(s[j]) - M) for j in s if labels[j] != labels[i]),
                        torch.zeros((), dtype=embed.dtype))
        a = torch.relu((m_p - F.cosine_similarity(embed[i], proxy[i], dim=0)) / t)
        losses.append(a + torch.log(torch.exp(-a) + negatives))
    return sum(losses) / m
