import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's note; minorpo needs no NumPy
