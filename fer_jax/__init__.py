"""fer_jax: fast, reproducible facial-expression recognition training in JAX/Flax."""


def __getattr__(name):  # `fer_jax.Predictor` without importing jax on `import fer_jax`
  if name == 'Predictor':
    from fer_jax.predict import Predictor

    return Predictor
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
