"""Planning a training run before launching it: GPU memory, tokens per sample and time (`iadgpt plan`)."""
