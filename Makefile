# rob: the two commands of the README, and the measurements behind its tables.
PYTHON ?= python3
export HF_HUB_OFFLINE = 1

.PHONY: install test test-slow demo teachers reproduce transfer gpu-check

install:  ## the pinned requirements (+ Debian's Fashion-MNIST when it is missing and apt is there)
	$(PYTHON) -m pip install -q -r requirements.txt
	@[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v apt-get >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  echo "Fashion-MNIST will be downloaded by torchvision on first use"

test: install  ## the test suite, two tests at a time (one thread each): about 7 minutes on 2 CPU cores
	$(PYTHON) -m pip install -q pytest pytest-xdist scikit-image==0.26.0  # (scikit-image: the transfer tasks' photographs)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest tests -q -m "not slow" -n 2

test-slow: install  ## the Fashion-MNIST training runs per method (18 minutes on 2 CPU cores)
	$(PYTHON) -m pip install -q pytest pytest-xdist
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest tests -q -m slow -n 2

demo: install  ## RoB-DINO vs plain DINO on Fashion-MNIST from the shipped teacher, evaluated (CPU, about 9 minutes)
	bash reproduce/demo.sh

teachers:  ## train the four Fashion-MNIST teachers again into assets/ (hours on 2 CPU cores, minutes on a GPU)
	bash reproduce/train_teachers.sh

reproduce:  ## the README's Fashion-MNIST table and curves, all four methods, from the teachers in assets/
	bash reproduce/fashion_mnist.sh

transfer:  ## RoB and plain students vs supervised distillation, on Fashion-MNIST and three transfer tasks (hours on a CPU)
	$(PYTHON) -m pip install -q scikit-image==0.26.0  # the photos task's photographs, not a dependency of the trainers
	bash reproduce/transfer.sh

gpu-check:  ## the README's GPU tables (one GPU, about 6 minutes)
	bash benchmarks/gpu_check.sh bench_out
