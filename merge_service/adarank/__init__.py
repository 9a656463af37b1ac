"""AdaRank (METHODS.md section 12): calibration data, model families and their `f_t`, the
factored task vectors and the optimisation loop. The method itself is
`merge_service.methods.adarank`; the engine runs it as a whole-model step."""
