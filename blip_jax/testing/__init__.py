"""Test and benchmark support: tiny PyTorch reference models (`torch_refs`, needs the [test]
extra). Not used by the library itself."""
