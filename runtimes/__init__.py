"""What runs a model: framework model files (`models/`), the backends behind one contract
(`backends/`), and, in this folder, what every backend shares above them: the sampler, the
generate loop, the serving engine, the benchmark and the precision agreement.
"""
