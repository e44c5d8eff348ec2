"""Guards that put a calibrated model back when a `fit` / `evaluate` / `predict` call fails.

Keras skips `on_*_end` when a call raises, so a callback that hooks the model
there (`kq.CalibrationCallback`) would leave it hooked. `guard` wraps the
model's step function and its `make_*_function` so that the hooks come off
on an exception in a step, or at the start of the next call at the latest
(every call, `*_on_batch` included, makes its function first).

Example:

>>> restore = guard(model, "predict_function", "make_predict_function", callback.detach)  # doctest: +SKIP
"""

__all__ = ["guard", "END_OF_DATA"]

# Exceptions that end a call's data, which Keras catches: the hooks stay for the rest of the call.
END_OF_DATA = ("StopIteration", "OutOfRangeError")


def guard(model, function_name, maker_name, detach):
    """Make `model.<function_name>` call `detach()` on an exception, and `model.<maker_name>` call it first.

    Args:
        model: The hooked Keras model.
        function_name: Its step function attribute (`"predict_function"`, ...), already hooked.
        maker_name: The method every call makes that function with (`"make_predict_function"`, ...).
        detach: Removes the hooks, restoring the step function; it calls the returned `restore`.

    Returns:
        `restore()`: puts `model.<maker_name>` back as it was (call it from `detach`).
    """
    function = getattr(model, function_name)
    own_maker = model.__dict__.get(maker_name)

    def guarded(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as e:
            if type(e).__name__ not in END_OF_DATA:
                detach()
            raise

    def make(*args, **kwargs):
        detach()  # a new call: the model as it was (the callback re-attaches in its on_*_begin)
        return getattr(model, maker_name)(*args, **kwargs)

    def restore():
        if own_maker is None:
            model.__dict__.pop(maker_name, None)
        else:
            setattr(model, maker_name, own_maker)

    guarded.__wrapped__ = function  # the step function itself (the same one on every call that reuses it)
    setattr(model, function_name, guarded)
    setattr(model, maker_name, make)
    return restore
