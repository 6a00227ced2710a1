"""The loss ops: autograd Functions over per-backend primitives, one op, one name in every layer.

    clip_loss.py / siglip_loss.py     the autograd Functions (backend-agnostic, distributed-aware)
    <op>_torch.py                     portable chunked PyTorch primitives, the reference backend
    <op>_triton.py                    launchers of the Triton kernels in kernels/<op>.py
    <op>_cuda.py                      custom ops over the CUDA C++ extension (csrc/<op>.cu)
    options.py                        the options value each loss call carries, validated once
    triton_common.py, cuda_common.py  launch plumbing of one fused backend; gemm.py, chunking.py,
                                      normalize.py, workspace.py, output_shapes.py: shared helpers

The primitive contract
----------------------
Every backend's ``<op>_<backend>.py`` (listed in ``fastclip.backends.BACKENDS``) defines these four
functions, each a ``torch.library`` custom op with a fake kernel, with exactly these signatures:

    clip_loss_fwd(image, text, scale, bias, with_expectations: bool, positive_offset: int, deterministic: bool)
        -> (row_lse (b,), col_lse (n,), row_expect (b,) or (0,), col_expect (n,) or (0,), positive_logit (b,))
    clip_loss_bwd(image, text, scale, bias, row_lse, col_lse, row_coef, col_coef,
                  positive_offset: int, deterministic: bool)
        -> (grad_image (b, D), grad_text (n, D), grad_scale ())
    siglip_loss_fwd(image, text, scale, bias, positive_offset: int, deterministic: bool) -> loss_sum ()
    siglip_loss_bwd(image, text, scale, bias, positive_offset: int, grad_coef, deterministic: bool)
        -> (grad_image (b, D), grad_text (n, D), grad_bias ())

image (b, D) rows against text (n, D) columns, S = scale * image @ text.T + bias; scale, bias and
grad_coef are 0-dim; the positives are the pairs j = i + positive_offset (the distributed layer
passes rank * b); outputs in the accumulation dtype (fp32; fp64 for the torch backend's fp64).

clip_loss_fwd: row_lse / col_lse the log-sum-exps of S's rows / columns (col_lse a partial over
these rows), and with_expectations the expected log-probabilities row_expect_i = sum_j P_ij log P_ij
and col_expect_j = sum_i Q_ij log Q_ij (minus the entropies, in log form so that nothing of size |S|
cancels; the distributed local-loss scale gradient needs them, docs/numerics.md). positive_logit_i
= S_i,i+positive_offset exactly as the tile that summed it into the statistics rounded it (0 where
that column is not in this call; in a ring only the step holding the rank's own block has them):
the per-pair loss lse_i - S_ii and the local loss's (E[log P] + lse_i - S_ii) / scale are small
differences where a softmax sits on its positive, and a diagonal from any other summation (a row
dot, even an exact one) misses the tile's by ~|S| eps, which they would amplify (docs/numerics.md).

clip_loss_bwd: G = R + C, R_ij = row_coef_i (P_ij - [pos]), C_ij = col_coef_j (Q_ij - [pos]), with
P, Q = exp(S - row_lse), exp(S - col_lse); grad_image = scale G @ text, grad_text = scale G.T @ image,
and grad_scale = sum_ij (R_ij log P_ij + C_ij log Q_ij) / scale, this block's share of d/d scale:
over any split of the whole S into blocks (the exchanges' row and column blocks) the shares add up to
sum_ij G_ij x_ij, because every row of R and column of C of the whole sums to 0. That form keeps the
digits the fp32 log-sum-exps' rounding would cost sum G x (see kernels/clip_loss.py); every backend
(torch, triton, cuda) returns it (docs/numerics.md).

siglip_loss_fwd: sum_ij softplus(-y_ij S_ij), y = +1 on the positives and -1 elsewhere.
siglip_loss_bwd: G = grad_coef (sigmoid(S) - [pos]); (scale G @ text, scale G.T @ image, sum G).

``deterministic=True`` asks for bitwise-repeatable results; with False a backend may take a faster
path whose last bits vary from run to run (triton: the locked column merge of its forward). A
backend declares ``deterministic=True`` when it can honour it. The exact math is in the reference
backend, ``clip_loss_torch.py`` and ``siglip_loss_torch.py``.
"""
