"""neurond: the virtual-machine daemon of NeuronOS."""

__version__ = "0.1.0"
