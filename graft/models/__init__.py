"""Networks: backbones (registry and sources), surgery, heads, batch norm, the grafted model and the run folder."""
