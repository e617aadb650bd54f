"""Pure math of the federated statistics, shared by sites and server.

Each module has the site-side "contribution" functions (rows in, additive
aggregates out) and the server-side "combine" functions (summed aggregates in,
estimates out). No I/O, no Flower, no patient data kept.
"""
