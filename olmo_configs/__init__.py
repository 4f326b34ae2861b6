"""The OLMo size ladder (4M-4B) as ai2-olmo TrainConfig YAMLs, and what generates and checks them."""
