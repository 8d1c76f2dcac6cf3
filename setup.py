"""Packaging driven by nbdev's settings.ini (nbdev 2 convention)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

requirements = cfg.get('requirements', '').split()
dev_requirements = cfg.get('dev_requirements', '').split()
console_scripts = [s.strip() for s in cfg.get('console_scripts', '').split() if s.strip()]

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    author=cfg['author'], author_email=cfg['author_email'], license='Apache-2.0',
    url=cfg['git_url'], python_requires='>=' + cfg['min_python'],
    packages=setuptools.find_packages(include=['latent_thoughts', 'latent_thoughts.*']),
    include_package_data=True,
    package_data={'latent_thoughts': ['tasks/**/*', 'tasks/*']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'gpu': ['flash-attn>=2.6'], 'tensorboard': ['tensorboard']},
    entry_points={'console_scripts': console_scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False,
)
