"""Cascades that many tests read, in the text form: one copy of each."""

# FuseMax's 3-pass attention, exactly as in the design notes (p: queries, m: keys).
ATTENTION_3PASS = """
inputs Q[e, p], K[e, m], V[f, m]
QK[m, p] = Q[e, p] * K[e, m]
GM[p]    = max(m) QK[m, p]
SN[m, p] = exp(QK[m, p] - GM[p])
SD[p]    = SN[m, p]
A[m, p]  = SN[m, p] / SD[p]
AV[f, p] = A[m, p] * V[f, m]
outputs AV
"""
