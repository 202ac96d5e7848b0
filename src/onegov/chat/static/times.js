// Show the times of the archive and the transcripts in local time.
import {localizeTimes} from './client.js';

localizeTimes(document);
